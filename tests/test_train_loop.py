"""The training loop (`emo-jax train`): exact resume after SIGKILL, SIGTERM saves,
NaN stops with the step, clear one-line checkpoint errors, metrics and plots.

The kill/resume scenario runs the real command in subprocesses on a small built
text_files dataset, so the grain iterator state goes through the checkpoint too.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emo_jax.config import load_config
from text_dataset import build_text_dataset, train_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A built text_files dataset 'text_files/loop' (3 domains) with its own tokenizer."""
    return build_text_dataset(tmp_path_factory.mktemp("loopdata"))


def _overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model.vocab_size=320", "model.d_model=32", "model.head_dim=8", "model.expert_hidden=32",
            "data.dataset=text_files/loop", f"data.data_dir={data_dir}", "data.seq_len=32",
            "data.global_batch_size=16", "mesh.data=2", "mesh.expert=4", f"train.steps={STEPS}", "train.micro_batches=2", "train.log_every=1",
            "train.checkpoint_every=4", "train.eval_every=12", "train.eval_batches=2", "train.progress_bar=false",
            f"train.run_dir={run_dir}", *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _command(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emo_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            *_overrides(data_dir, run_dir, *extra)]


def _run(data_dir: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(data_dir, run_dir, *extra), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _saved_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _start_and_signal(data_dir: Path, run_dir: Path, sig: int, after_checkpoint: int) -> tuple[int, str]:
    """Starts a run, sends `sig` once the checkpoint of step `after_checkpoint` is on disk."""
    proc = subprocess.Popen(_command(data_dir, run_dir), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if after_checkpoint in _saved_steps(run_dir):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """One uninterrupted run, and one run stopped by SIGTERM, resumed, killed by SIGKILL
    and resumed again."""
    tmp = tmp_path_factory.mktemp("runs")
    straight = _run(data_dir, tmp / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    broken = tmp / "broken"
    term_code, term_out = _start_and_signal(data_dir, broken, signal.SIGTERM, after_checkpoint=4)
    after_term = _saved_steps(broken)
    resumed = _start_and_signal(data_dir, broken, signal.SIGKILL, after_checkpoint=16)
    after_kill = _saved_steps(broken)
    final = _run(data_dir, broken)
    assert final.returncode == 0, final.stderr[-3000:]
    return dict(straight=tmp / "straight", broken=broken, term_code=term_code, term_out=term_out,
                after_term=after_term, kill_code=resumed[0], after_kill=after_kill, final_out=final.stdout)


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(runs):
    assert runs["term_code"] == 0, runs["term_out"][-3000:]
    assert "SIGTERM: saving step" in runs["term_out"]
    stopped_at = max(runs["after_term"])
    assert 4 <= stopped_at < STEPS, runs["after_term"]  # it stopped mid-run, and saved where it stopped
    assert f"SIGTERM: saving step {stopped_at}" in runs["term_out"]


def test_resume_after_sigkill_gives_bitwise_identical_losses(runs):
    assert runs["kill_code"] == -signal.SIGKILL
    assert max(runs["after_kill"]) < STEPS, "the run was killed before it finished"
    assert "resumed from" in runs["final_out"]
    expected, got = train_losses(runs["straight"]), train_losses(runs["broken"])
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert sorted(got) == sorted(expected)
    mismatched = [s for s in expected if got[s] != expected[s]]  # bitwise: exact float equality
    assert not mismatched, [(s, expected[s], got[s]) for s in mismatched]


def test_metrics_log_has_every_field_and_eval_per_domain(runs):
    rows = [json.loads(line) for line in (runs["straight"] / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r["split"] == "train")
    for key in ("loss", "cross_entropy", "load_balance", "router_z", "grad_norm", "learning_rate",
                "tokens_per_second", "steps_per_second", "mfu", "load_entropy", "load_max_over_mean",
                "mean_pool_size"):
        assert key in train_row, key
    # Values, not only keys (mfu=None passed before whatever the device).
    from emo_jax.train import metrics as metrics_lib
    for key in ("loss", "cross_entropy", "load_balance", "router_z", "grad_norm", "learning_rate",
                "tokens_per_second", "steps_per_second", "mean_pool_size"):
        assert isinstance(train_row[key], float) and math.isfinite(train_row[key]), (key, train_row[key])
    assert train_row["tokens_per_second"] > 0 and train_row["steps_per_second"] > 0
    assert train_row["cross_entropy"] < train_row["loss"]
    assert len(train_row["load_max_over_mean"]) == 2 and min(train_row["load_max_over_mean"]) >= 1.0
    assert 4 <= train_row["mean_pool_size"] <= 8  # tiny.yaml: pool sizes drawn from [4, 8]
    peak = metrics_lib.peak_flops_per_device()
    if peak is None:  # CPU: no peak FLOP/s entry, MFU not reported
        assert train_row["mfu"] is None
    else:
        assert 0 < train_row["mfu"] < 1
    assert len(train_row["load_entropy"]) == 2  # per layer
    assert all(0 <= h <= math.log(7) + 1e-6 for h in train_row["load_entropy"])  # over n_r = 7 experts
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in eval_rows] == [12, 24]
    assert {"loss/red", "loss/green", "loss/blue"} <= set(eval_rows[0])
    assert all(math.isfinite(r["loss"]) for r in eval_rows)
    for name in ("domain_cosine", "centered_cosine", "usage_cosine", "experts_for_90pct_mass"):
        assert len(eval_rows[0][f"specialisation/{name}"]) == 2, name  # per layer
    assert json.loads((runs["straight"] / "analysis" / "analysis.json").read_text())["step"] == STEPS
    for png in ("specialisation.png", "analysis/expert_usage.png", "analysis/domain_cosine.png"):
        assert (runs["straight"] / png).stat().st_size > 1000, png
    assert "centred cosine" in runs["final_out"]  # the summary printed after training
    assert list((runs["straight"] / "tensorboard").iterdir()), "TensorBoard event files"
    assert (runs["straight"] / "loss_curve.png").stat().st_size > 1000


# --- in-process: NaN, bad checkpoints -----------------------------------------------------

def _config(data_dir: Path, run_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", _overrides(data_dir, run_dir, *extra))


def test_nan_loss_stops_the_run_naming_the_step(data_dir, tmp_path, monkeypatch):
    from emo_jax.train import loop

    real = loop.make_sharded_trainer

    def poisoned(config, *args, **kwargs):
        trainer = real(config, *args, **kwargs)

        def step(state, batch, rng):
            bad = int(state.step) == 3  # the 4th step (step index 3) returns NaN; read before donation
            new_state, metrics = trainer.step(state, batch, rng)
            return new_state, dict(metrics, loss=np.where(bad, np.nan, metrics["loss"]))
        return trainer._replace(step=step)

    monkeypatch.setattr(loop, "make_sharded_trainer", poisoned)
    # The 4th step: step 4 in the logs and checkpoint names (it said "step 3", 0-based).
    with pytest.raises(loop.NonFiniteLossError, match=r"loss is nan at step 4; .*optimizer\.peak_lr="):
        loop.train(_config(data_dir, tmp_path / "nan", "train.steps=6"))


def test_corrupt_checkpoint_gives_one_line_error(data_dir, tmp_path, capsys):
    from emo_jax import cli

    run_dir = tmp_path / "corrupt"
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), *_overrides(data_dir, run_dir, "train.steps=4")]
    assert cli.main(args) == 0
    step_dir = run_dir / "checkpoints" / "4" / "state"
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    assert files
    for p in files:  # overwrite every file of the state item with garbage
        p.write_bytes(b"\x00garbage\xff" * 7)
    capsys.readouterr()
    assert cli.main(args[:-1] + ["train.steps=8"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "checkpoints/4" in err and ("corrupt" in err or "unreadable" in err), err


def test_config_mismatch_gives_one_line_error(data_dir, tmp_path, capsys):
    from emo_jax import cli

    run_dir = tmp_path / "mismatch"
    base = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), *_overrides(data_dir, run_dir, "train.steps=4")]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main(base + ["model.expert_hidden=48"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.expert_hidden=32" in err and "model.expert_hidden=48" in err, err
    # --no-resume refuses to overwrite the old run's checkpoints, in one line too
    assert cli.main(base + ["model.expert_hidden=48", "--no-resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-resume" in err and "run_dir" in err, err


def test_eos_segments_must_use_the_tokenizers_eos(data_dir, tmp_path):
    """routing.segments=eos with another tokenizer's EOS id (e.g. the released configs'
    100257 on the bundled corpus) would make every row one router document."""
    from emo_jax.config import ConfigError
    from emo_jax.data.tokenizer import load_tokenizer
    from emo_jax.train import batches
    eos = load_tokenizer(data_dir / "text_files" / "loop" / "1.0.0").eos_id
    batches.check_vocabulary(_config(data_dir, tmp_path, "routing.segments=eos", f"routing.eos_id={eos}"))
    with pytest.raises(ConfigError, match=f"routing.eos_id={eos + 1}.*set routing.eos_id={eos}"):
        batches.check_vocabulary(_config(data_dir, tmp_path, "routing.segments=eos", f"routing.eos_id={eos + 1}"))
