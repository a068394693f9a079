"""The training loop: data, sharded step, metrics, validation, checkpoints, SIGTERM.

Everything inside one step is the pure jitted function of `train/step.py`; this
module does the I/O around it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emo_jax.compat import use_mesh
from emo_jax.config import Config
from emo_jax.train import batches as batch_sources
from emo_jax.train import metrics as metrics_lib
from emo_jax.train.checkpoint import CheckpointError, Checkpointer, nonfinite_loss_message
from emo_jax.train.evaluate import evaluate, make_eval_step
from emo_jax.train.sharded import make_sharded_trainer
from emo_jax.train.step import BATCH_KEYS


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: list[float]  # loss of every step this process ran, in order
    stopped_by_signal: bool
    run_dir: Path


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() on multi-host launches (TPU pods set their own env;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)."""
    if os.environ.get("EMO_JAX_DISTRIBUTED", "auto") == "off":
        return
    multi_host = "JAX_COORDINATOR_ADDRESS" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ \
        or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    if multi_host and not jax.distributed.is_initialized():
        jax.distributed.initialize()


class _SigtermFlag:
    """Turns SIGTERM (TPU preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config: Config, resume: bool = True) -> TrainResult:
    """Trains `config`; resumes from the latest checkpoint in run_dir when one exists."""
    maybe_initialize_distributed()
    run_dir = Path(config.train.run_dir)
    trainer = make_sharded_trainer(config)
    mesh = trainer.mesh
    source = batch_sources.train_batches(config)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.train.checkpoint_every,
                                config.train.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(run_dir)
    base_key = jax.random.PRNGKey(config.train.seed)

    def to_device(batch: dict) -> dict:
        keys = BATCH_KEYS + (("domain_ids",) if "domain_ids" in batch else ())
        return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, np.asarray(batch[k]))
                for k in keys}

    if not resume and checkpointer.latest_step() is not None:
        latest = checkpointer.latest_step()
        checkpointer.close()
        writer.close()
        raise CheckpointError(f"{checkpointer.directory} already holds checkpoints (latest step "
                              f"{latest}); --no-resume needs a fresh run_dir: pass "
                              "train.run_dir=NEW_DIR or delete the old checkpoints.")
    restored = checkpointer.restore(trainer.abstract_state, config) if resume else None
    if restored is not None:
        state = restored.state
        if restored.data_state:
            source.set_state(restored.data_state)
        start = restored.step
        _log(f"resumed from {checkpointer.directory}/{start}")
    else:
        state = trainer.init_state(base_key)
        start = 0

    flops_token = metrics_lib.flops_per_token(config, metrics_lib.active_matmul_params(config))
    peak = metrics_lib.peak_flops_per_device()
    eval_step = None
    total = config.train.steps
    _log(f"{config.name}: steps {start}->{total}, mesh {dict(mesh.shape)}, batch "
         f"{config.data.global_batch_size} x {config.data.seq_len}, {config.train.micro_batches} micro-batch(es), "
         f"lb_scope={config.loss.lb_scope}, pool={config.routing.pool}, data={config.data.dataset}, "
         f"{jax.device_count()} x {jax.devices()[0].device_kind}")

    progress = None
    if config.train.progress_bar and sys.stderr.isatty() and jax.process_index() == 0:
        from tqdm import tqdm
        progress = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    losses: list[float] = []
    stopped = False
    step = start
    window_start, window_tokens = time.perf_counter(), 0.0
    try:
        with _SigtermFlag() as sigterm, use_mesh(mesh):
            while step < total:
                batch = to_device(next(source))
                state, step_metrics = trainer.step(state, {k: batch[k] for k in BATCH_KEYS},
                                                   jax.random.fold_in(base_key, step))
                loss = float(step_metrics["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLossError(nonfinite_loss_message(loss, step + 1, checkpointer.latest_step(),
                                                                    config))
                losses.append(loss)
                step += 1
                window_tokens += float(step_metrics["tokens"])
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.3f}")
                if step % config.train.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - window_start
                    m = metrics_lib.to_python(step_metrics)
                    m["tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                    m["steps_per_second"] = config.train.log_every / max(elapsed, 1e-9)
                    m["mfu"] = (m["tokens_per_second"] * flops_token / (peak * jax.device_count())
                                if peak else None)
                    writer.write(step, m)
                    if progress is None:
                        _log(metrics_lib.format_line(step, m))
                    window_start, window_tokens = time.perf_counter(), 0.0
                if config.train.eval_every and (step % config.train.eval_every == 0 or step == total):
                    if eval_step is None:
                        eval_iter, domains = batch_sources.eval_batches(config)
                        eval_step = jax.jit(make_eval_step(trainer.model, len(domains)))
                    else:
                        eval_iter, domains = batch_sources.eval_batches(config)
                    result = evaluate(eval_step, state.params, eval_iter, domains, to_device)
                    writer.write(step, result, prefix="eval")
                    _log(f"eval step {step}: loss {result['loss']:.4f}  " + "  ".join(
                        f"{k.split('/', 1)[1]} {v:.3f}" for k, v in result.items() if k.startswith("loss/")))
                if checkpointer.should_save(step):
                    checkpointer.save(step, state, source.get_state(), config, config.train.seed)
                if sigterm.raised:
                    _log(f"SIGTERM: saving step {step} and stopping")
                    if checkpointer.latest_step() != step:  # not saved by the periodic save just now
                        checkpointer.save(step, state, source.get_state(), config, config.train.seed, force=True)
                    stopped = True
                    break
            else:
                if config.train.checkpoint_every and checkpointer.latest_step() != step:
                    checkpointer.save(step, state, source.get_state(), config, config.train.seed, force=True)
    finally:
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    return TrainResult(final_step=step, losses=losses, stopped_by_signal=stopped, run_dir=run_dir)


def plot_loss_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plots train (and eval) loss from run_dir/metrics.jsonl into a PNG."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["cross_entropy"] for r in train_rows], label="train CE")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-", label="validation CE")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
