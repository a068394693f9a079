"""MoE layer forward+backward time: single device (per grouped-matmul backend) and
expert parallel (shard_map + all_to_all) on several meshes, printed as a table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python benchmarks/bench_moe.py                  (~2-4 minutes on 2 cores)
  .venv/bin/python benchmarks/bench_moe.py --tokens 8192 --d-model 2048 --experts 128 \\
    --hidden 1024 --top-k 8 --meshes 1x1x1          (EMO's layer, on an accelerator)
  ... --vs-peers                                     (cost vs P of the dense exchange)

--vs-peers: the expert-parallel layer on meshes 1x1xP (P = 1, 2, 4, 8 emulated devices,
the same global batch) with the dense all_to_all at three buffer sizes: worst case
([P, M, D], kernels.exchange_capacity=none), bounded (the --capacity factor, default
1.5 x M / P rows per peer), and a forced overflow (factor 0.01: every step takes the
worst-case branch of the cond, which shows its cost when it is taken).

On emulated CPU devices all "devices" share the same cores, so expert parallelism
cannot be faster than one device here: the table shows what the exchange costs, not
a speed-up. Every row times jit(value_and_grad) of the same scalar, median of
--repeats runs after one warm-up; all rows of one table come from one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from emo_jax.compat import use_mesh
from emo_jax.config import MeshConfig
from emo_jax.moe import make_moe_layer
from emo_jax.parallel import build_mesh, make_expert_parallel_moe


def make_inputs(tokens: int, seq: int, d: int, h: int, e: int, n_shared: int, k_r: int, pool: int, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    rows = tokens // seq
    x = jax.random.normal(keys[0], (rows, seq, d), jnp.float32)
    w_router = jax.random.normal(keys[1], (d, e - n_shared), jnp.float32) * 0.02
    w_gate = jax.random.normal(keys[2], (e, d, h), jnp.float32) * 0.02
    w_up = jax.random.normal(keys[3], (e, d, h), jnp.float32) * 0.02
    w_down = jax.random.normal(keys[4], (e, h, d), jnp.float32) * 0.02
    # 4 documents per row
    segment_ids = jnp.broadcast_to(1 + jnp.arange(seq) * 4 // seq, (rows, seq)).astype(jnp.int32)
    pool_sizes = jnp.full((rows, seq + 1), pool, jnp.int32) if pool else None
    return (x, w_router, w_gate, w_up, w_down), segment_ids, pool_sizes


def time_layer(fn, args, segment_ids, pool_sizes, k_r, n_shared, repeats, mesh=None) -> float:
    def loss(x, wr, wg, wu, wd):
        y, st = fn(x, segment_ids, pool_sizes, wr, wg, wu, wd, routed_top_k=k_r, n_shared=n_shared)
        return jnp.sum(y * y) + jnp.sum(st.prob_sums)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
    ctx = use_mesh(mesh) if mesh is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        jax.block_until_ready(step(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times.append(time.perf_counter() - start)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--shared", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=4, help="experts per token, shared included")
    parser.add_argument("--pool", type=int, default=8, help="fixed pool size (0 = standard MoE)")
    parser.add_argument("--backends", nargs="+", default=["reference", "blocked"])
    parser.add_argument("--meshes", nargs="+", default=["8x1x1", "2x1x4", "1x2x4", "1x1x8"],
                        help="data x fsdp x expert shapes for the expert-parallel rows")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--ep-backend", default="auto", help="grouped matmul inside the expert-parallel rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vs-peers", action="store_true", help="cost-vs-P table of the dense exchange")
    parser.add_argument("--capacity", type=float, default=1.5, help="exchange capacity factor for --vs-peers")
    a = parser.parse_args()
    if a.vs_peers:
        return vs_peers(a)

    k_r = a.top_k - a.shared
    args, seg, pools = make_inputs(a.tokens, a.seq, a.d_model, a.hidden, a.experts, a.shared, k_r, a.pool)
    flops = 2 * 3 * a.tokens * a.top_k * a.d_model * a.hidden * 3  # 3 matmuls, fwd + 2 bwd
    print(f"MoE layer fwd+bwd: T={a.tokens} D={a.d_model} H={a.hidden} E={a.experts} (shared {a.shared}) "
          f"top-{a.top_k} pool={a.pool or 'none'}; {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print(f"{'setup':38s} {'time (ms)':>10s} {'expert GFLOP/s':>15s} {'vs first row':>13s}")
    rows = []
    for backend in a.backends:
        t = time_layer(make_moe_layer(backend), args, seg, pools, k_r, a.shared, a.repeats)
        rows.append((f"1 device, {backend}", t))
    for shape in a.meshes:
        d, f, e = (int(v) for v in shape.split("x"))
        if d * f * e > jax.device_count():
            print(f"skip mesh {shape}: needs {d * f * e} devices")
            continue
        mesh = build_mesh(MeshConfig(data=d, fsdp=f, expert=e))
        fn = make_expert_parallel_moe(mesh, a.transport, backend=a.ep_backend)
        t = time_layer(fn, args, seg, pools, k_r, a.shared, a.repeats, mesh)
        from emo_jax.parallel.expert_parallel import resolve_transport
        rows.append((f"mesh {shape}, {resolve_transport(a.transport)}", t))
    for name, t in rows:
        print(f"{name:38s} {1e3 * t:10.1f} {flops / t / 1e9:15.2f} {rows[0][1] / t:12.2f}x")


def vs_peers(a) -> None:
    """Cost vs P table (see the module docstring)."""
    k_r = a.top_k - a.shared
    args, seg, pools = make_inputs(a.tokens, a.seq, a.d_model, a.hidden, a.experts, a.shared, k_r, a.pool)
    print(f"MoE layer fwd+bwd vs expert-parallel peers P: T={a.tokens} D={a.d_model} H={a.hidden} E={a.experts} "
          f"(shared {a.shared}) top-{a.top_k} pool={a.pool or 'none'}; meshes 1x1xP of {jax.device_count()} "
          f"emulated {jax.devices()[0].device_kind} devices sharing the machine's cores; jax {jax.__version__}; "
          f"median of {a.repeats}")
    base = time_layer(make_moe_layer(a.ep_backend), args, seg, pools, k_r, a.shared, a.repeats)
    print(f"{'P':>2s} {'worst case (ms)':>16s} {'bounded ' + format(a.capacity, 'g') + 'x (ms)':>19s} "
          f"{'forced overflow (ms)':>21s} {'worst / 1 dev':>14s} {'bounded / 1 dev':>16s}")
    print(f"{1:2d} {1e3 * base:16.1f} {'(one device, no exchange)':>41s}")
    for p in (2, 4, 8):
        if p > jax.device_count():
            print(f"skip P={p}: needs {p} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
            continue
        mesh = build_mesh(MeshConfig(data=1, fsdp=1, expert=p), devices=jax.devices()[:p])
        t = {name: time_layer(make_expert_parallel_moe(mesh, "all_to_all", backend=a.ep_backend, capacity_factor=cf),
                              args, seg, pools, k_r, a.shared, a.repeats, mesh)
             for name, cf in (("worst", None), ("bounded", a.capacity), ("overflow", 0.01))}
        print(f"{p:2d} {1e3 * t['worst']:16.1f} {1e3 * t['bounded']:19.1f} {1e3 * t['overflow']:21.1f} "
              f"{t['worst'] / base:13.2f}x {t['bounded'] / base:15.2f}x")


if __name__ == "__main__":
    main()
