"""Section `correctness`: every GPU kernel, lowered and run, against its reference.

  MoE expert computation (dispatch_rows -> gmm x 3 -> combine_rows, custom VJPs with the
  gate-gradient and tgmm kernels): `pallas.moe_ffn` vs `reference.moe_ffn`, the output
  and the gradients w.r.t. x, gates and the three weights; padding tokens carry NaN
  inputs and gates (their outputs must be exactly 0) and one expert gets no token (its
  weight gradients must be exactly 0). Cases: small f32, small bf16, and EMO's widths
  (D, E, H, K) with `check_tokens` tokens in bf16.
  The reference contracts (dispatch / grouped_matmul / combine, what the expert-parallel
  path calls) through the Pallas backend vs `kernels.reference`, with gradients.
  Flash attention (`attention_pallas.gpu_flash_attention`) vs `reference_attention` on
  packed rows with padding, output and q/k/v gradients: small f32 and bf16, and EMO's
  S, NH, HD in bf16.

The reference runs in float32 ("highest" precision) on the same rounded inputs, except the
MoE case at EMO's widths, whose reference runs in bf16: XLA may lower ragged_dot on a GPU
to E dense matmuls (E x the FLOPs), which in float32 would take minutes.

Error = max |kernel - reference| / max |reference| over the compared entries (inf if the
kernel gave a NaN or inf anywhere). Tolerances: float32 5e-3 (jax's flash kernel multiplies
float32 tiles at the default precision, TF32 on a GPU: errors near 1e-3; a wrong row or a
dropped term is O(1e-1) or more), bf16 3e-2.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.accelcheck import problems
from emo_jax.accelcheck.context import Context, flash_attention, moe_backend
from emo_jax.accelcheck.report import SectionLog
from emo_jax.kernels import reference
from emo_jax.kernels.attention import reference_attention

TOL = {"float32": 5e-3, "bfloat16": 3e-2}
GRAD_NAMES = ("d_x", "d_gates", "d_w_gate", "d_w_up", "d_w_down")


def rel_err(actual, expected, mask=None) -> float:
    """max |actual - expected| / max |expected| over `mask` rows (all by default); inf if
    `actual` holds a non-finite value anywhere."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(a)):
        return float("inf")
    if mask is not None:
        a, b = a[np.asarray(mask)], b[np.asarray(mask)]
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a - b))) / scale


def check(log: SectionLog, name: str, err: float, tol: float, detail: str = "") -> bool:
    """Logs a `check` record: passed when err is finite and <= tol."""
    passed = bool(np.isfinite(err) and err <= tol)
    log.add({"kind": "check", "name": name, "passed": passed, "rel_err": err, "tol": tol, "detail": detail})
    return passed


def _cast(case: problems.MoECase, dtype) -> problems.MoECase:
    c = lambda a: a.astype(dtype)  # noqa: E731
    return case._replace(x=c(case.x), w_gate=c(case.w_gate), w_up=c(case.w_up), w_down=c(case.w_down),
                         cot=c(case.cot))


def moe_value_and_grads(ffn, case: problems.MoECase):
    """jit(value_and_grad) of sum(where(valid, y, 0) * cot) w.r.t. x, gates, the weights."""
    valid = case.valid

    def loss(x, gates, wg, wu, wd):
        y = ffn(x, case.ids, gates, valid, wg, wu, wd)
        masked = jnp.where(valid[:, None], y, 0).astype(jnp.float32)
        return jnp.sum(masked * case.cot.astype(jnp.float32)), y

    f = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))
    return jax.block_until_ready(f(case.x, case.gates, case.w_gate, case.w_up, case.w_down))


def check_moe(ctx: Context, log: SectionLog, label: str, case: problems.MoECase, dtype, ref_dtype) -> None:
    """The Pallas expert computation in `dtype` vs the reference in `ref_dtype`."""
    tol = TOL[jnp.dtype(dtype).name]
    start = time.perf_counter()
    (loss, y), grads = moe_value_and_grads(moe_backend(ctx, "pallas").moe_ffn, _cast(case, dtype))
    kernel_s = time.perf_counter() - start
    rounded = _cast(_cast(case, dtype), ref_dtype)
    with jax.default_matmul_precision("highest"):
        (ref_loss, ref_y), ref_grads = moe_value_and_grads(reference.moe_ffn, rounded)
    valid = np.asarray(case.valid)
    t, k = case.ids.shape
    e, d, h = case.w_gate.shape
    shape = f"T={t} K={k} E={e} D={d} H={h} {jnp.dtype(dtype).name} (reference {jnp.dtype(ref_dtype).name})"
    check(log, f"moe_ffn {label}: output", rel_err(y, ref_y, valid), tol, f"{shape}; first call {kernel_s:.1f} s")
    cancel = float(jnp.sum(jnp.abs(jnp.where(valid[:, None], ref_y, 0).astype(jnp.float32)
                                   * rounded.cot.astype(jnp.float32))))
    loss_err = abs(float(loss) - float(ref_loss)) / max(cancel, 1e-30) if np.isfinite(float(loss)) else float("inf")
    check(log, f"moe_ffn {label}: loss", loss_err, tol, "|diff| / sum |y * cot|")
    for name, g, rg in zip(GRAD_NAMES, grads, ref_grads):
        rows = valid if name in ("d_x", "d_gates") else None
        check(log, f"moe_ffn {label}: {name}", rel_err(g, rg, rows), tol)
    pad_rows = np.asarray(jnp.asarray(y, jnp.float32))[~valid]
    check(log, f"moe_ffn {label}: padding outputs exactly 0", float(np.max(np.abs(pad_rows), initial=0.0)), 0.0)
    empty = max(float(jnp.max(jnp.abs(g[problems.EMPTY_EXPERT].astype(jnp.float32)))) for g in grads[2:])
    check(log, f"moe_ffn {label}: gradients of the expert without tokens exactly 0", empty, 0.0)


def check_contracts(ctx: Context, log: SectionLog, t: int, k: int, e: int, d: int, h: int) -> None:
    """dispatch -> grouped_matmul -> combine through the Pallas backend vs the reference
    backend, value and gradients (float32)."""
    case = problems.moe_case(t, k, e, d, h, jnp.float32, seed=3, padding=False)
    valid = jnp.asarray(np.random.default_rng(3).random(t) < 0.7)
    cot = jax.random.normal(jax.random.PRNGKey(1), (t, h), jnp.float32)

    def run(be):
        def f(x, gates, w):
            sent = be.dispatch(x, case.ids, valid, e)
            y_sorted = be.grouped_matmul(sent.x_sorted, w, sent.group_sizes)
            return jnp.sum(be.combine(y_sorted, sent.order, sent.valid_sorted, gates) * cot), y_sorted
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(case.x, case.gates, case.w_gate)

    (val, y_sorted), grads = run(moe_backend(ctx, "pallas"))
    with jax.default_matmul_precision("highest"):
        (ref_val, ref_y_sorted), ref_grads = run(moe_backend(ctx, "reference"))
    tol = TOL["float32"]
    check(log, "contracts: grouped_matmul rows (0 past sum(group_sizes))", rel_err(y_sorted, ref_y_sorted), tol,
           f"T={t} K={k} E={e} D={d} H={h} float32")
    check(log, "contracts: loss", rel_err(val, ref_val), tol)
    for name, g, rg in zip(("d_x", "d_gates", "d_w"), grads, ref_grads):
        check(log, f"contracts: {name}", rel_err(g, rg), tol)


def check_attention(ctx: Context, log: SectionLog, label: str, b: int, s: int, nh: int, hd: int, dtype) -> None:
    """Flash attention in `dtype` vs the reference in float32: several documents per row,
    padding at the end of row 0."""
    sh = ctx.shapes
    seg = problems.packed_segments(b, s, max(sh.min_doc, s // 16), max(sh.min_doc, s // 3), seed=b + s)
    seg[0, s - max(1, s // 16):] = 0  # padding at the end of row 0
    seg = jnp.asarray(seg)
    q, k, v, cot = problems.qkv(b, s, nh, hd, dtype, seed=s)
    flash = flash_attention(ctx)

    def value_and_grads(fn, q, k, v):
        def loss(q, k, v):
            out = fn(q, k, v, seg)
            return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), out
        return jax.block_until_ready(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v))

    start = time.perf_counter()
    (_, out), grads = value_and_grads(flash, q, k, v)
    kernel_s = time.perf_counter() - start
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        (_, ref_out), ref_grads = value_and_grads(reference_attention, f32(q), f32(k), f32(v))
    tol = TOL[jnp.dtype(dtype).name]
    detail = f"B={b} S={s} NH={nh} HD={hd} {jnp.dtype(dtype).name}, {int(seg.max())} documents max/row, padding; " \
             f"first call {kernel_s:.1f} s"
    check(log, f"flash attention {label}: output", rel_err(out, ref_out), tol, detail)
    for name, g, rg in zip(("d_q", "d_k", "d_v"), grads, ref_grads):
        check(log, f"flash attention {label}: {name}", rel_err(g, rg), tol)


def run(ctx: Context, log: SectionLog) -> None:
    sh = ctx.shapes
    t, k, e, d, h = sh.small
    b, s, nh, hd = sh.attention_small
    checks = [
        ("moe small f32", lambda: check_moe(ctx, log, "small f32", problems.moe_case(t, k, e, d, h, jnp.float32, 1),
                                            jnp.float32, jnp.float32)),
        ("moe small bf16", lambda: check_moe(ctx, log, "small bf16", problems.moe_case(t, k, e, d, h, jnp.float32, 2),
                                             jnp.bfloat16, jnp.float32)),
        ("contracts", lambda: check_contracts(ctx, log, t, min(k, 2), e, d, h)),
        ("attention small f32", lambda: check_attention(ctx, log, "small f32", b, s, nh, hd, jnp.float32)),
        ("attention small bf16", lambda: check_attention(ctx, log, "small bf16", b, s, nh, hd, jnp.bfloat16)),
        ("attention EMO shape bf16", lambda: check_attention(ctx, log, f"{sh.name} shape bf16", sh.batch, sh.seq,
                                                             sh.heads, sh.head_dim, jnp.bfloat16)),
        ("moe EMO widths bf16", lambda: check_moe(
            ctx, log, f"{sh.name} widths bf16",
            problems.moe_case(sh.check_tokens, sh.top_k, sh.experts, sh.d_model, sh.hidden, jnp.float32, 4),
            jnp.bfloat16, jnp.bfloat16)),
    ]
    for name, fn in checks:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - record it; the other checks still run
            log.error(name, err)
