"""The accelerator check (emo_jax.accelcheck, launch/accelerator_check.sh) on CPU.

The tiny run goes through every section with the GPU kernels in Pallas's interpreter:
the code a GPU run executes, with only the shapes and the interpret flag changed. A
deliberately broken kernel must be reported as failed, with a non-zero exit code; a
hung section must be killed at its limit and recorded; the FLOP formulas are checked
by hand on small cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emo_jax.accelcheck import flops, report, runner
from emo_jax.train.metrics import peak_for

sys.path.insert(0, os.path.dirname(__file__))
from accelcheck_helpers import assert_sections_ok, run_tiny  # noqa: E402
from lowering_helpers import abstract_gpu, shapes_only  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- pure parts


def test_flop_formulas_by_hand():
    # [8, 3] x [3, 5]: 8 * 5 outputs, 3 multiply-adds each -> 240 FLOPs.
    assert flops.grouped_matmul(8, 3, 5) == 240
    assert flops.swiglu(8, 3, 5) == 3 * 240
    # 4 tokens x 2 experts = 8 rows of SwiGLU (720) + the router [4, 3] x [3, 7] (168).
    assert flops.moe_layer(4, 3, 5, 2, 7, backward=False) == 720 + 168
    assert flops.moe_layer(4, 3, 5, 2, 7) == 3 * 888
    # S = 4, one head of 2: S^2 / 2 = 8 pairs; QK^T 8 * 2 * 2 and PV 8 * 2 * 2 -> 64.
    assert flops.causal_attention(1, 4, 1, 2, backward=False) == 64
    assert flops.causal_attention(3, 4, 5, 2) == 3 * 64 * 3 * 5
    # documents of 2 and 3 tokens and one padding token: 3 + 6 + 1 visible pairs.
    assert flops.visible_pairs(np.array([[1, 1, 2, 2, 2, 0]])) == 10
    assert flops.mfu(1e12, 2.0, 1e12) == 0.5
    assert flops.mfu(1e12, 2.0, None) is None
    assert peak_for("NVIDIA H200", flops.FP32_PEAK_FLOPS) == 67e12
    assert peak_for("cpu", flops.FP32_PEAK_FLOPS) is None


def test_train_step_flops_match_the_formula_by_hand():
    """metrics.flops_per_token for the tiny step model, counted from the shapes by hand."""
    from emo_jax.accelcheck.shapes import TINY
    from emo_jax.accelcheck.train_step import step_config
    from emo_jax.train.metrics import active_matmul_params, flops_per_token

    s = TINY
    d, nh, hd, e, h, k, v, layers = s.d_model, s.heads, s.head_dim, s.experts, s.hidden, s.top_k, s.vocab, s.layers
    per_layer = (4 * d * nh * hd  # q, k, v, o
                 + d * (e - 1)  # router
                 + k * 3 * d * h  # top-k experts (shared included)
                 + 2 * d)  # two norms
    active = layers * per_layer + d + d * v  # final norm + LM head (the input embedding is not a matmul)
    config = step_config(s)
    assert active_matmul_params(config) == active
    attention = 2 * 2 * s.seq * nh * hd / 2 * layers
    assert flops_per_token(config, active) == 3 * (2 * active + attention)


def test_report_status_exit_code_and_markdown():
    ok = {"kind": "check", "name": "a", "passed": True, "rel_err": 0.0, "tol": 1e-3}
    bad = {"kind": "check", "name": "b", "passed": False, "rel_err": float("inf"), "tol": 1e-3}
    err = {"kind": "error", "name": "row", "error": "ValueError: x"}
    assert report.section_status([ok], finished=True) == "ok"
    assert report.section_status([ok, bad], finished=True) == "failed"
    assert report.section_status([ok, err], finished=True) == "error"
    assert report.section_status([ok], finished=False) == "error"
    assert report.section_status([ok], finished=True, timed_out=True) == "timeout"
    sec = lambda status, records=(): {"status": status, "records": list(records), "seconds": 1.0}  # noqa: E731
    assert report.exit_code({"sections": {"correctness": sec("ok", [ok]), "kernels": sec("ok")}}) == 0
    assert report.exit_code({"sections": {"correctness": sec("ok", [ok]), "kernels": sec("error", [err])}}) == 3
    assert report.exit_code({"sections": {"correctness": sec("timeout", [ok]), "kernels": sec("ok")}}) == 1
    assert report.exit_code({"sections": {"correctness": sec("ok"), "moe_layer": sec("failed", [bad])}}) == 1
    doc = {"meta": {"mode": "m"}, "exit_code": 1, "sections": {"correctness": sec("failed", [ok, bad])}}
    text = report.render_markdown(doc)
    assert "| b | FAIL | inf |" in text and "## correctness: failed" in text
    log = report.SectionLog("x")
    log.add(bad)
    assert log.records[0]["rel_err"] == "inf"  # JSON has no inf: stored as a string
    json.dumps(log.as_dict(), allow_nan=False)


# ------------------------------------------------------------------------- the tiny run


def test_tiny_interpret_correctness_passes(tmp_path):
    """Every correctness check at tiny shapes with the GPU kernels interpreted passes, and
    every number in the results is finite (the benchmark sections: test_accelcheck_benchmarks)."""
    rc, doc = run_tiny(tmp_path, "--sections", "correctness")
    assert list(doc["sections"]) == ["env", "correctness"]
    assert_sections_ok(doc)
    assert rc == 0 and doc["exit_code"] == 0
    checks = [r for r in doc["sections"]["correctness"]["records"] if r["kind"] == "check"]
    names = " ".join(r["name"] for r in checks)
    for what in ("moe_ffn small f32", "moe_ffn small bf16", "moe_ffn tiny widths bf16", "contracts",
                 "flash attention small f32", "flash attention tiny shape bf16", "d_w_down", "d_gates", "d_q"):
        assert what in names, what
    assert len(checks) >= 40 and all(r["passed"] for r in checks)
    assert "NOT accelerator numbers" in doc["meta"]["mode"]


def test_broken_kernels_fail_the_check(tmp_path, monkeypatch):
    """A grouped matmul and a flash attention that are 5 % off are reported as failed
    checks, and the run exits 1."""
    from emo_jax.kernels import attention_pallas, pallas, pallas_gpu

    good_gmm, good_flash = pallas_gpu.gmm, attention_pallas.gpu_flash_attention
    monkeypatch.setattr(pallas_gpu, "gmm", lambda *a, **kw: good_gmm(*a, **kw) * 1.05)
    monkeypatch.setattr(attention_pallas, "gpu_flash_attention", lambda *a, **kw: good_flash(*a, **kw) * 1.05)
    pallas.kernel_set.cache_clear()
    pallas.backend.cache_clear()
    try:
        rc, doc = run_tiny(tmp_path, "--sections", "correctness")
    finally:
        pallas.kernel_set.cache_clear()
        pallas.backend.cache_clear()
    assert rc == 1 and doc["exit_code"] == 1
    section = doc["sections"]["correctness"]
    assert section["status"] == "failed"
    failed = [r["name"] for r in section["records"] if r["kind"] == "check" and not r["passed"]]
    assert any(n.startswith("moe_ffn small f32: output") for n in failed), failed
    assert any(n.startswith("flash attention small f32: output") for n in failed), failed
    # what the broken kernels do not touch still passes
    passed = [r["name"] for r in section["records"] if r["kind"] == "check" and r["passed"]]
    assert any("padding outputs exactly 0" in n for n in passed), passed


def test_slow_implementations_are_skipped_later(tmp_path, monkeypatch):
    """An implementation whose first call exceeds timing.SLOW_FIRST_S (0 here: every one) is
    not timed, its later rows are skipped, and later sections skip it too (hints passed on)."""
    from emo_jax.accelcheck import timing

    monkeypatch.setattr(timing, "SLOW_FIRST_S", 0.0)
    rc, doc = run_tiny(tmp_path, "--sections", "kernels", "moe_layer", "step_reference")
    assert rc == 0, doc
    kernels = doc["sections"]["kernels"]["records"]
    timed = [r for r in kernels if r["kind"] == "bench"]
    assert {r["impl"] for r in timed} >= {"xla", "pallas", "capacity", "blocked", "reference"}
    assert all(r["seconds"] is None and "not timed" in r["note"] for r in timed)
    assert len({r["impl"] for r in timed}) == len(timed)  # one row per implementation, the rest skipped
    assert any(r["kind"] == "info" and str(r["value"]).startswith("skipped: slow") for r in kernels)
    layer = doc["sections"]["moe_layer"]["records"]
    assert not [r for r in layer if r["kind"] == "bench"]
    assert sum(str(r.get("value", "")).startswith("skipped: slow") for r in layer) == 4
    step = doc["sections"]["step_reference"]["records"]
    assert [r["value"] for r in step if r["name"] == "train step [reference]"][0].startswith("skipped: slow")


def test_emo_shape_programs_lower_for_cuda():
    """The GPU run's programs at EMO's shape, with the compiled kernels at their real tiles,
    lower for CUDA without a GPU (Triton's block and tile rules; PTX is only built on the
    device): the expert computation's forward and gradients (every MoE kernel), flash
    attention's forward and gradients at S = 4096, and the whole training step."""
    import jax
    import jax.numpy as jnp

    from emo_jax.accelcheck import train_step
    from emo_jax.accelcheck.context import Context, flash_attention, moe_backend
    from emo_jax.accelcheck.shapes import EMO

    ctx = Context(EMO, interpret=False)
    t, d, e, h, k = EMO.tokens, EMO.d_model, EMO.experts, EMO.hidden, EMO.top_k
    sds, bf16, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32

    def lower(fn, *args):
        with abstract_gpu():
            return fn.trace(*shapes_only(args)).lower(lowering_platforms=("cuda",)).as_text()

    ffn = moe_backend(ctx, "pallas").moe_ffn
    grads = jax.jit(jax.value_and_grad(
        lambda x, g, a, b, c, ids, valid: jnp.sum(ffn(x, ids, g, valid, a, b, c).astype(f32)), argnums=range(5)))
    text = lower(grads, sds((t, d), bf16), sds((t, k), f32), sds((e, d, h), bf16), sds((e, d, h), bf16),
                 sds((e, h, d), bf16), sds((t, k), jnp.int32), sds((t,), bool))
    for kernel in ("moe_gather_rows", "moe_combine_rows", "moe_gate_grads", "moe_gmm", "moe_tgmm"):
        assert kernel in text, kernel

    flash = flash_attention(ctx)
    q = sds((EMO.batch, EMO.seq, EMO.heads, EMO.head_dim), bf16)
    attn = jax.jit(jax.value_and_grad(lambda q, k, v, s: jnp.sum(flash(q, k, v, s).astype(f32)), argnums=(0, 1, 2)))
    text = lower(attn, q, q, q, sds((EMO.batch, EMO.seq), jnp.int32))
    assert "mha_forward" in text and "mha_backward" in text

    program = train_step.build(ctx, "pallas")
    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(program.init, key)
    batch = {name: sds(v.shape, v.dtype) for name, v in train_step.synthetic_batches(EMO, 1)[0].items()}
    text = lower(program.step, state, batch, key)
    assert "moe_tgmm" in text and "mha_backward" in text


# ------------------------------------------------------------------------- the launcher and isolation


def _cli(*args, timeout=300, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, **(env_extra or {})}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(ROOT / "launch" / "accelerator_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_launcher_help_and_dry_run():
    out = _cli("--help", timeout=60)
    assert out.returncode == 0 and "--tiny" in out.stdout and "--budget" in out.stdout
    out = _cli("--dry-run", timeout=60)
    assert out.returncode == 0, out.stderr
    for name in runner.SECTION_NAMES:
        assert name in out.stdout


def test_launcher_runs_a_section_in_a_subprocess_and_kills_a_hung_one(tmp_path):
    """The env section through the launcher (its own process, results file and log in
    --out); then the same with a time limit it cannot meet: killed, recorded, exit 3."""
    out = _cli("--tiny", "--interpret", "--sections", "env", "--out", str(tmp_path / "ok"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads((tmp_path / "ok" / runner.RESULTS_NAME).read_text())
    env = doc["sections"]["env"]
    assert env["status"] == "ok" and doc["meta"]["isolation"] == "subprocess"
    peaks = next(r["value"] for r in env["records"] if r["name"] == report.PEAKS_RECORD)
    assert peaks["bf16"]["measured"] > 0 and peaks["fp32"]["measured"] > 0
    assert (tmp_path / "ok" / "accelerator_check.log").read_text().count("=== section env") == 1
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["accelerator_check.json", "accelerator_check.log"]

    out = _cli("--tiny", "--interpret", "--sections", "env", "correctness", "--limit-scale", "0.0005",
               "--out", str(tmp_path / "hung"))
    doc = json.loads((tmp_path / "hung" / runner.RESULTS_NAME).read_text())
    assert doc["sections"]["env"]["status"] == "timeout", doc["sections"]["env"]
    assert "time limit" in doc["sections"]["env"]["error"]
    assert doc["sections"]["correctness"]["status"] == "skipped"
    assert out.returncode == 1 and doc["exit_code"] == 1  # correctness did not run


def test_no_gpu_without_interpret_stops_after_env(tmp_path):
    """Compiled kernels on a CPU: a one-line reason, the other sections skipped, exit 1."""
    rc = runner.main(["--in-process", "--sections", "env", "correctness", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / runner.RESULTS_NAME).read_text())
    assert rc == 1
    assert "--tiny --interpret" in doc["sections"]["env"]["error"]
    assert doc["sections"]["correctness"]["status"] == "skipped"


def test_check_imports_only_what_the_gpu_image_has():
    """Every section's module imports without the packages the GPU image lacks (grain,
    tensorflow-datasets, array_record, tensorboardX) and without torch."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'grain', 'tensorflow_datasets', 'array_record', 'tensorflow', 'tensorboardX',
                                  'torch', 'transformers'}:
            raise ImportError('the GPU image has no ' + name)
sys.meta_path.insert(0, Block())
from emo_jax.accelcheck import runner, env, correctness, bench, train_step  # noqa
print('imported', sorted(m for m in sys.modules if m.startswith('emo_jax.data')))
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported []" in out.stdout


@pytest.mark.slow
def test_tiny_interpret_full_run_through_the_launcher(tmp_path):
    """All eight sections, each in its own process, as a GPU run executes them (~2 min)."""
    out = _cli("--tiny", "--interpret", "--out", str(tmp_path), timeout=1200)
    assert out.returncode == 0, out.stdout[-5000:]
    doc = json.loads((tmp_path / runner.RESULTS_NAME).read_text())
    assert list(doc["sections"]) == list(runner.SECTION_NAMES)
    assert all(s["status"] == "ok" for s in doc["sections"].values())
