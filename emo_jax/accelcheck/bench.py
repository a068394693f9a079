"""Sections `kernels`, `moe_layer` and `attention`: bf16 benchmarks at the check's shape.

kernels (T tokens, K copies each, M = T K rows, D -> H; the last expert is the shared one,
a copy with gate 1 as `kernels.reference` sees it):
  dense rows         one [M, D] x [D, H] matmul, and a dense SwiGLU over M rows, of the same
                     FLOPs as the grouped ones: the ceiling
  grouped matmul     Pallas `gmm` on the aligned buffer; `ragged_dot` (the reference); with
                     jax's own Pallas-Triton ragged_dot lowering where that jax has it (GPU)
  dispatch+combine   forward+backward, Pallas vs reference, GB/s (bytes as bench_kernels.py)
  expert computation moe_ffn forward+backward per backend: pallas, capacity, blocked, reference
moe_layer: the whole layer (router, EMO's random document pools, routed experts, the dense
  shared expert), forward+backward per backend, on [B, S, D]; every backend's output and
  gradients are checked against the first one's, capacity (plain XLA, tested against the
  reference on CPU): a correctness check of the others at the full shape.
attention: flash (Pallas Triton), blocked (pure JAX) and reference (S x S mask), forward and
  forward+backward, one document per row and packed documents.

Rows whose lowering may be pathological on a GPU (ragged_dot) run last. Every row is
independent: one that raises is recorded as an error and the others still run.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import routing
from emo_jax.accelcheck import flops as flops_lib
from emo_jax.accelcheck import problems
from emo_jax.accelcheck.context import Context, blocked_attention, flash_attention, moe_backend, moe_kernel_set
from emo_jax.accelcheck.correctness import TOL, check, rel_err
from emo_jax.accelcheck.report import SLOW_RECORD, SectionLog
from emo_jax.accelcheck.timing import bench_record, slow_reason, time_call
from emo_jax.kernels import layout as layout_lib
from emo_jax.kernels import pallas, reference
from emo_jax.kernels.attention import reference_attention
from emo_jax.moe import make_moe_layer

BF16 = jnp.bfloat16


def _sum_f32(y) -> jax.Array:
    return jnp.sum(y.astype(jnp.float32))


def _grad_fn(f: Callable, argnums) -> Callable:
    """jit(value_and_grad(sum(f(...)))) w.r.t. `argnums`."""
    return jax.jit(jax.value_and_grad(lambda *a: _sum_f32(f(*a)), argnums=argnums))


def _run_rows(ctx: Context, log: SectionLog, rows: list, slow: dict | None = None) -> dict:
    """rows: (name, impl, build -> (fn, args), flops, nbytes, note). Returns {(name, impl):
    seconds}. An implementation found slow (by an earlier section, or in `slow`, which
    this call adds to) is skipped."""
    seconds, slow = {}, {} if slow is None else slow
    for name, impl, build, flops, nbytes, note in rows:
        if impl in ctx.slow or impl in slow:
            log.info(f"{name} [{impl}]", f"skipped: slow ({ctx.slow.get(impl) or slow[impl]})")
            continue
        try:
            fn, args = build()
            timed = time_call(fn, args, ctx.shapes.repeats)
            log.add(bench_record(ctx, name, impl, timed, flops=flops, nbytes=nbytes, note=note))
            if timed["slow"]:
                slow[impl] = slow_reason(name, timed)
                log.info(SLOW_RECORD, dict(slow))
            else:
                seconds[(name, impl)] = timed["seconds"]
        except Exception as err:  # noqa: BLE001 - one row failing must not stop the others
            log.error(f"{name} [{impl}]", err)
    return seconds


def _vs(seconds: dict, log: SectionLog, pairs: list) -> None:
    for (row, base, label) in pairs:
        if row in seconds and base in seconds:
            log.info(label, round(seconds[row] / seconds[base], 3))


# ----------------------------------------------------------------------------- kernels


def kernels(ctx: Context, log: SectionLog) -> None:
    s = ctx.shapes
    t, d, e, h, k = s.tokens, s.d_model, s.experts, s.hidden, s.top_k
    m = t * k
    inp = problems.bench_routing(t, d, e, h, k, BF16)
    x, ids, gates, valid, wg, wu, wd = (inp[n] for n in ("x", "ids", "gates", "valid", "w_gate", "w_up", "w_down"))
    ks = moe_kernel_set(ctx)
    lay = jax.jit(layout_lib.group_layout, static_argnums=(2, 3))(ids, valid, e, ks.block_rows)
    sent = jax.jit(reference.dispatch, static_argnums=3)(x, ids, valid, e)
    log.info("problem", f"T={t} D={d} E={e} H={h} K={k} (1 shared) bf16, M={m} rows, "
                        f"aligned buffer {lay.rows.row_token.shape[0]} rows of blocks of {ks.block_rows}")
    gmm_flops = flops_lib.grouped_matmul(m, d, h)
    ffn_flops = 3 * flops_lib.swiglu(m, d, h)
    dc_bytes = (4 * m + 3 * (m + t)) * d * 2

    def dense():
        xm = jnp.tile(x, (k, 1))
        return jax.jit(lambda a, b: a @ b), (xm, wg[0])

    def dense_grad():
        fn, args = dense()
        return _grad_fn(lambda a, b: a @ b, (0, 1)), args

    def dense_swiglu():
        xm = jnp.tile(x, (k, 1))
        f = lambda a, g, u, dn: (jax.nn.silu(a @ g) * (a @ u)) @ dn  # noqa: E731
        return _grad_fn(f, (0, 1, 2, 3)), (xm, wg[0], wu[0], wd[0])

    def pallas_gmm():
        xs = jax.jit(lambda x: pallas.dispatch_rows(ks, x, lay.rows))(x)
        return jax.jit(lambda a, w: pallas.gmm(ks, a, w, lay)), (xs, wg)

    def pallas_gmm_grad():
        _, args = pallas_gmm()
        return _grad_fn(lambda a, w: pallas.gmm(ks, a, w, lay), (0, 1)), args

    def pallas_dc():
        f = lambda x, g: pallas.combine_rows(ks, pallas.dispatch_rows(ks, x, lay.rows), g, lay.rows)  # noqa: E731
        return _grad_fn(f, (0, 1)), (x, gates)

    def reference_dc():
        f = lambda x, g: reference.combine(x[sent.order // k], sent.order, sent.valid_sorted, g)  # noqa: E731
        return _grad_fn(f, (0, 1)), (x, gates)

    def ref_gmm():
        return jax.jit(lambda a, w: reference.grouped_matmul(a, w, sent.group_sizes)), (sent.x_sorted, wg)

    def ref_gmm_grad():
        return _grad_fn(lambda a, w: reference.grouped_matmul(a, w, sent.group_sizes), (0, 1)), (sent.x_sorted, wg)

    def ffn(name):
        def build():
            be = moe_backend(ctx, name)
            f = lambda x, g, a, b, c: be.moe_ffn(x, ids, g, valid, a, b, c)  # noqa: E731
            return _grad_fn(f, (0, 1, 2, 3, 4)), (x, gates, wg, wu, wd)
        return build

    rows = [
        ("dense matmul [M,D]x[D,H] fwd (equal FLOPs)", "xla", dense, gmm_flops, 0, "the ceiling"),
        ("dense matmul fwd+bwd", "xla", dense_grad, 3 * gmm_flops, 0, ""),
        ("dense SwiGLU over M rows fwd+bwd", "xla", dense_swiglu, ffn_flops, 0, "the ceiling of the experts"),
        ("grouped matmul fwd", "pallas", pallas_gmm, gmm_flops, 0, ""),
        ("grouped matmul fwd+bwd", "pallas", pallas_gmm_grad, 3 * gmm_flops, 0, ""),
        ("dispatch+combine fwd+bwd", "pallas", pallas_dc, 0, dc_bytes, ""),
        ("dispatch+combine fwd+bwd", "reference", reference_dc, 0, dc_bytes, ""),
        ("expert computation fwd+bwd", "pallas", ffn("pallas"), ffn_flops, 0, ""),
        ("expert computation fwd+bwd", "capacity", ffn("capacity"), ffn_flops, 0, ""),
        ("expert computation fwd+bwd", "blocked", ffn("blocked"), ffn_flops, 0, ""),
        ("grouped matmul fwd", "reference", ref_gmm, gmm_flops, 0, "jax.lax.ragged_dot"),
        ("grouped matmul fwd+bwd", "reference", ref_gmm_grad, 3 * gmm_flops, 0, "jax.lax.ragged_dot"),
        ("expert computation fwd+bwd", "reference", ffn("reference"), ffn_flops, 0, "jax.lax.ragged_dot"),
    ]
    # jax's Triton ragged_dot runs before the XLA ragged_dot rows, which may be pathological.
    slow: dict = {}
    sec = _run_rows(ctx, log, rows[:-3], slow)
    sec.update(_triton_ragged_dot(ctx, log, sent, wg, gmm_flops))
    sec.update(_run_rows(ctx, log, rows[-3:], slow))
    dense_key = ("dense matmul [M,D]x[D,H] fwd (equal FLOPs)", "xla")
    _vs(sec, log, [
        (("grouped matmul fwd", "pallas"), dense_key, "pallas gmm fwd time / dense"),
        (("grouped matmul fwd+bwd", "pallas"), ("dense matmul fwd+bwd", "xla"), "pallas gmm fwd+bwd time / dense"),
        (("grouped matmul fwd", "reference"), dense_key, "ragged_dot fwd time / dense"),
        (("dispatch+combine fwd+bwd", "pallas"), ("dispatch+combine fwd+bwd", "reference"),
         "pallas dispatch+combine time / reference"),
        *[(("expert computation fwd+bwd", b), ("dense SwiGLU over M rows fwd+bwd", "xla"),
           f"{b} experts time / dense SwiGLU") for b in ("pallas", "capacity", "blocked", "reference")],
    ])


def _triton_ragged_dot(ctx: Context, log: SectionLog, sent, w, gmm_flops: float) -> dict:
    """ragged_dot through jax's own Pallas-Triton lowering (a config flag), GPU only."""
    name, impl = "grouped matmul fwd", "ragged_dot (jax Pallas-Triton lowering)"
    flag = "jax_ragged_dot_use_gpu_pallas_triton_lowering"
    if ctx.interpret or jax.default_backend() != "gpu":
        log.info(f"{impl}", "skipped: GPU only")
        return {}
    if not hasattr(jax.config, flag) or not _module_exists("jax._src.lax.pallas_lowerings.gpu.ragged_dot"):
        log.info(f"{impl}", f"skipped: jax {jax.__version__} has no {flag} (or no module behind it)")
        return {}
    jax.config.update(flag, True)
    try:
        return _run_rows(ctx, log, [(name, impl, lambda: (
            jax.jit(lambda a, w: reference.grouped_matmul(a, w, sent.group_sizes)), (sent.x_sorted, w)),
            gmm_flops, 0, "")])
    finally:
        jax.config.update(flag, False)


def _module_exists(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# ----------------------------------------------------------------------------- MoE layer

LAYER_BACKENDS = ("capacity", "pallas", "blocked", "reference")  # the first is the others' baseline


def moe_layer(ctx: Context, log: SectionLog) -> None:
    s = ctx.shapes
    b, seq, d, e, h, k = s.batch, s.seq, s.d_model, s.experts, s.hidden, s.top_k
    n_shared, k_r = 1, k - 1
    n_routed = e - n_shared
    keys = jax.random.split(jax.random.PRNGKey(7), 7)
    x = jax.random.normal(keys[0], (b, seq, d), BF16)
    w_router = jax.random.normal(keys[1], (d, n_routed), jnp.float32) / np.sqrt(d)
    w = lambda kk, *sh: (jax.random.normal(kk, sh, jnp.float32) / np.sqrt(sh[1])).astype(BF16)  # noqa: E731
    ws = (w(keys[2], e, d, h), w(keys[3], e, d, h), w(keys[4], e, h, d))
    seg = jnp.asarray(problems.packed_segments(b, seq, s.min_doc, s.max_doc, seed=7))
    pools = routing.draw_pool_sizes(keys[5], (b, seq + 1), k_r + 1, n_routed)  # EMO: UniformInt[k_r + 1, N]
    cot = jax.random.normal(keys[6], (b, seq, d), BF16)
    flops = flops_lib.moe_layer(b * seq, d, h, k, n_routed)
    log.info("problem", f"x [{b}, {seq}, {d}] bf16, E={e} (1 shared) H={h} top-{k}, random pools "
                        f"[{k_r + 1}, {n_routed}], {int(seg.max())} documents max/row")

    first = None
    for name in LAYER_BACKENDS:
        if name in ctx.slow:
            log.info(f"MoE layer fwd+bwd [{name}]", f"skipped: slow ({ctx.slow[name]})")
            continue
        try:
            fn = make_moe_layer(moe_backend(ctx, name))

            def loss(x, wr, wg, wu, wd, fn=fn):
                y, st = fn(x, seg, pools, wr, wg, wu, wd, routed_top_k=k_r, n_shared=n_shared)
                return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)) + jnp.sum(st.prob_sums), y

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
            timed = time_call(step, (x, w_router, *ws), s.repeats)
            log.add(bench_record(ctx, "MoE layer fwd+bwd", name, timed, flops=flops))
            if timed["slow"]:
                log.info(SLOW_RECORD, {name: slow_reason("MoE layer fwd+bwd", timed)})
            (_, y), grads = timed["out"]
            if first is None:
                first = (name, y, grads)
                continue
            for label, got, want in (("output", y, first[1]), ("d_x", grads[0], first[2][0]),
                                     ("d_w_gate", grads[2], first[2][2]), ("d_w_down", grads[4], first[2][4])):
                check(log, f"MoE layer {label}: {name} vs {first[0]}", rel_err(got, want), TOL["bfloat16"],
                      "bf16, full shape")
        except Exception as err:  # noqa: BLE001
            log.error(f"MoE layer fwd+bwd [{name}]", err)


# ----------------------------------------------------------------------------- attention


def attention(ctx: Context, log: SectionLog) -> None:
    s = ctx.shapes
    b, seq, nh, hd = s.batch, s.seq, s.heads, s.head_dim
    q, k, v, cot = problems.qkv(b, seq, nh, hd, BF16, seed=11)
    layouts = {"1 document/row": np.ones((b, seq), np.int32),
               "packed documents": problems.packed_segments(b, seq, s.min_doc, s.max_doc, seed=11)}
    kernels_ = {"flash": flash_attention(ctx), "blocked": blocked_attention(ctx), "reference": reference_attention}
    causal = flops_lib.causal_attention(b, seq, nh, hd)
    rows = []
    for layout, seg_np in layouts.items():
        seg = jnp.asarray(seg_np)
        density = flops_lib.visible_pairs(seg_np) / (b * seq * (seq + 1) / 2)
        note = f"{layout}: {density:.1%} of the causal pairs visible"
        for name, fn in kernels_.items():
            def fwd(fn=fn, seg=seg):
                return jax.jit(lambda q, k, v: fn(q, k, v, seg)), (q, k, v)

            def fwd_bwd(fn=fn, seg=seg):
                g = jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * cot),
                                       argnums=(0, 1, 2))
                return jax.jit(g), (q, k, v)

            rows.append((f"attention fwd, {layout}", name, fwd, causal / 3, 0, note))
            rows.append((f"attention fwd+bwd, {layout}", name, fwd_bwd, causal, 0, note))
    log.info("problem", f"B={b} S={seq} NH={nh} HD={hd} bf16, tiles {s.attention_block}; FLOPs count the "
                        "S^2/2 causal pairs (documents make the kernels' useful work smaller: see each note)")
    sec = _run_rows(ctx, log, rows)
    _vs(sec, log, [((f"attention fwd+bwd, {lay}", "flash"), (f"attention fwd+bwd, {lay}", "reference"),
                    f"flash fwd+bwd time / reference, {lay}") for lay in layouts])
