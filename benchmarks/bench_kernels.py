"""MoE kernels, reference (XLA) vs Pallas: dispatch, combine, grouped matmul and the whole
MoE layer (forward+backward), with achieved GB/s and TFLOP/s, printed as a table.

  .venv/bin/python benchmarks/bench_kernels.py                       (CPU, ~1 minute)
  .venv/bin/python benchmarks/bench_kernels.py --size emo --dtype bfloat16 \\
      --peak-gbs 3350 --peak-tflops 989                               (an H100 SXM)

--size emo is EMO's layer: 8192 tokens, d_model 2048, 128 experts of hidden 1024,
top-8 (shared expert included). Each row is jit'ed and timed as the median of
--repeats runs after a warm-up. On CPU the Pallas kernels only run interpreted: those
rows say "correctness only, no timing" and report the largest difference from the
reference on a tiny problem instead (interpret mode is a simulator; its speed means
nothing). Quote only numbers measured on the accelerator, with this command line and
the device printed in the header.

Bytes: dispatch reads and writes one D-row per token copy (2 M D s); combine reads
M rows and writes T ((M + T) D s); dispatch+combine forward+backward moves
(4 M + 3 (M + T)) D s; index and gate traffic is not counted. FLOPs: a
grouped matmul does 2 M D H useful FLOPs (forward); the "dense" row is one [M, D] x
[D, H] matmul with the same FLOPs, the ceiling a grouped matmul is measured against.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import kernels
from emo_jax.kernels import layout as layout_lib
from emo_jax.kernels import pallas, reference
from emo_jax.moe import make_moe_layer

SIZES = {  # tokens, d_model, experts, hidden, top_k (shared included)
    "tiny": (256, 64, 8, 64, 4),
    "small": (2048, 256, 16, 256, 4),
    "medium": (8192, 1024, 64, 512, 8),
    "emo": (8192, 2048, 128, 1024, 8),
}
INTERPRET_CHECK = (64, 32, 8, 32, 4)  # the tiny problem interpreted kernels are checked on


def routing_inputs(tokens: int, d: int, e: int, h: int, k: int, dtype, seed: int = 0):
    """Uniformly random distinct experts per token (expert e-1 shared, always chosen)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 7)
    scores = jax.random.uniform(keys[0], (tokens, e - 1))
    ids = jnp.argsort(scores, axis=-1)[:, :k - 1].astype(jnp.int32)
    ids = jnp.concatenate([ids, jnp.full((tokens, 1), e - 1, jnp.int32)], axis=1)
    gates = jnp.concatenate([jax.random.uniform(keys[1], (tokens, k - 1)) / k, jnp.ones((tokens, 1))], axis=1)
    x = jax.random.normal(keys[2], (tokens, d), dtype)
    w = lambda kk, *s: (jax.random.normal(kk, s, jnp.float32) * 0.02).astype(dtype)
    return dict(x=x, ids=ids, gates=gates.astype(jnp.float32), valid=jnp.ones((tokens,), bool),
                w_gate=w(keys[3], e, d, h), w_up=w(keys[4], e, d, h), w_down=w(keys[5], e, h, d))


def median_time(fn: Callable, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ops(impl: str, ks: pallas.KernelSet | None, inp: dict, e: int):
    """{row name: (jitted fn, args, bytes, flops)} for one implementation."""
    x, ids, gates, valid = inp["x"], inp["ids"], inp["gates"], inp["valid"]
    t, k = ids.shape
    d, h = x.shape[1], inp["w_gate"].shape[2]
    m = t * k
    s = jnp.dtype(x.dtype).itemsize
    out = {}
    if impl == "pallas":
        lay = jax.jit(layout_lib.group_layout, static_argnums=(2, 3))(ids, valid, e, ks.block_rows)
        xs = pallas.dispatch_rows(ks, x, lay.rows)
        ys = jnp.zeros((lay.rows.row_token.shape[0], d), x.dtype)
        dispatch = jax.jit(lambda x: pallas.dispatch_rows(ks, x, lay.rows))
        combine = jax.jit(lambda ys, g: pallas.combine_rows(ks, ys, g, lay.rows))
        gmm = jax.jit(lambda xs, w: pallas.gmm(ks, xs, w, lay))
        both = lambda x, g: pallas.combine_rows(ks, pallas.dispatch_rows(ks, x, lay.rows), g, lay.rows)
        gmm_args = (xs, inp["w_gate"])
        ffn = make_moe_layer(pallas.backend(ks))
    else:
        be = kernels.backend_for(impl)
        sent = jax.jit(reference.dispatch, static_argnums=3)(x, ids, valid, e)
        ys = jnp.zeros((m, d), x.dtype)
        dispatch = jax.jit(lambda x: x[sent.order // k])  # the gather; the sort is layout, timed apart
        combine = jax.jit(lambda ys, g: reference.combine(ys, sent.order, sent.valid_sorted, g))
        gmm = jax.jit(lambda xs, w: be.grouped_matmul(xs, w, sent.group_sizes))
        both = lambda x, g: reference.combine(x[sent.order // k], sent.order, sent.valid_sorted, g)
        gmm_args = (sent.x_sorted, inp["w_gate"])
        ffn = make_moe_layer(impl)
    if impl != "blocked":  # blocked shares the reference's dispatch and combine
        out["dispatch (gather)"] = (dispatch, (x,), 2 * m * d * s, 0)
        out["combine"] = (combine, (ys, gates), (m + t) * d * s, 0)
        grad_both = jax.jit(jax.value_and_grad(lambda x, g: jnp.sum(both(x, g).astype(jnp.float32)),
                                               argnums=(0, 1)))
        # forward (dispatch + combine) + backward (d combine: a gather of dy and the gate
        # gradients, which read M + T rows; d dispatch: a combine).
        out["dispatch+combine fwd+bwd"] = (grad_both, (x, gates), (4 * m + 3 * (m + t)) * d * s, 0)
    out["grouped matmul fwd [M,D]x[E,D,H]"] = (gmm, gmm_args, 0, 2 * m * d * h)
    grad_gmm = jax.jit(jax.value_and_grad(lambda xs, w: jnp.sum(gmm(xs, w).astype(jnp.float32)), argnums=(0, 1)))
    out["grouped matmul fwd+bwd"] = (grad_gmm, gmm_args, 0, 3 * 2 * m * d * h)

    seq = 512 if t % 512 == 0 else t
    x3, seg = x.reshape(t // seq, seq, d), jnp.ones((t // seq, seq), jnp.int32)
    w_router = jnp.zeros((d, e - 1), jnp.float32)

    def layer_loss(x3, wg, wu, wd):
        y, _ = ffn(x3, seg, None, w_router, wg, wu, wd, routed_top_k=k - 1, n_shared=1)
        return jnp.sum(y.astype(jnp.float32))

    grad_layer = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1, 2, 3)))
    out["MoE layer fwd+bwd"] = (grad_layer, (x3, inp["w_gate"], inp["w_up"], inp["w_down"]), 0, 3 * 3 * 2 * m * d * h)
    return out


def dense_row(inp: dict, m: int) -> tuple:
    x = jnp.tile(inp["x"], (m // inp["x"].shape[0], 1))
    w = inp["w_gate"][0]
    return jax.jit(lambda a, b: a @ b), (x, w), 0, 2 * m * x.shape[1] * w.shape[1]


def interpret_check(platform: str) -> float:
    """max |pallas - reference| / max |reference| of the expert computation (forward) on
    a tiny problem, the `platform` kernels interpreted on CPU."""
    t, d, e, h, k = INTERPRET_CHECK
    inp = routing_inputs(t, d, e, h, k, jnp.float32)
    ks = (pallas.kernel_set("cpu", block_rows=8, tile_rows=8, tile_tokens=8) if platform == "tpu"
          else pallas.kernel_set("gpu", True, block_rows=16, tile_rows=16, tile_tokens=8))
    ref = reference.moe_ffn(inp["x"], inp["ids"], inp["gates"], inp["valid"], inp["w_gate"], inp["w_up"],
                            inp["w_down"])
    got = pallas.moe_ffn(inp["x"], inp["ids"], inp["gates"], inp["valid"], inp["w_gate"], inp["w_up"],
                         inp["w_down"], ks=ks)
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="problem size (default: emo on an accelerator, tiny on CPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=None,
                        help="reference, blocked, pallas (default: reference pallas; reference blocked on CPU)")
    parser.add_argument("--block-rows", type=int, default=pallas.DEFAULT_BLOCK_ROWS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-gbs", type=float, default=0.0, help="HBM bandwidth for the %% column (H100 SXM: 3350)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak for the %% column (H100 bf16: 989)")
    args = parser.parse_args()

    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    size = args.size or ("tiny" if on_cpu else "emo")
    impls = args.impls or (["reference", "blocked"] if on_cpu else ["reference", "pallas"])
    t, d, e, h, k = SIZES[size]
    dtype = jnp.dtype(args.dtype)
    inp = routing_inputs(t, d, e, h, k, dtype)
    print(f"# {' '.join(sys.argv)}")
    print(f"# device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
    print(f"# size {size}: tokens {t}, d_model {d}, experts {e}, hidden {h}, top-{k} (1 shared), {dtype.name}, "
          f"block rows {args.block_rows}, median of {args.repeats}")

    header = ("op", "impl", "ms", "GB/s", "TFLOP/s", "% peak", "vs reference")
    rows = []
    ref_ms: dict[str, float] = {}
    for impl in impls + (["pallas (interpret)"] if on_cpu else []):
        if impl == "pallas (interpret)":
            for kernels_of in ("tpu", "gpu"):
                rows.append((f"MoE expert computation fwd ({kernels_of} kernels)", impl, "-", "", "", "",
                             f"correctness only, no timing: rel. max|diff| {interpret_check(kernels_of):.1e} "
                             f"at {INTERPRET_CHECK[0]} tokens"))
            continue
        ks = pallas.kernel_set(platform, block_rows=args.block_rows) if impl == "pallas" else None
        for name, (fn, fargs, nbytes, flops) in ops(impl, ks, inp, e).items():
            sec = median_time(fn, fargs, args.repeats)
            gbs = nbytes / sec / 1e9 if nbytes else None
            tfs = flops / sec / 1e12 if flops else None
            peak = (gbs / args.peak_gbs if gbs and args.peak_gbs else tfs / args.peak_tflops if tfs and args.peak_tflops
                    else None)
            if impl == "reference":
                ref_ms[name] = sec
            speedup = f"{ref_ms[name] / sec:.2f}x" if name in ref_ms and impl != "reference" else ""
            rows.append((name, impl, f"{sec * 1e3:.3f}", f"{gbs:.3g}" if gbs else "", f"{tfs:.3g}" if tfs else "",
                         f"{100 * peak:.0f}%" if peak else "", speedup))
    fn, fargs, _, flops = dense_row(inp, t * k)
    sec = median_time(fn, fargs, args.repeats)
    tfs = flops / sec / 1e12
    rows.append(("dense matmul [M,D]x[D,H] (equal FLOPs)", "xla", f"{sec * 1e3:.3f}", "", f"{tfs:.3g}",
                 f"{100 * tfs / args.peak_tflops:.0f}%" if args.peak_tflops else "", ""))

    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for i, row in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if on_cpu:
        print("# CPU: XLA:CPU lowers ragged_dot densely (E x the useful FLOPs); these timings say nothing "
              "about an accelerator.")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
