"""Attention kernels: compiled scratch memory against S, and forward+backward time.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_attention.py             (~3 minutes on 2 cores)
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_attention.py --skip-memory --rounds 9

Table 1 (memory): for S = 512 ... 8192, one row of 8 heads of 32, the temporary bytes
XLA allocates for jit(grad(sum(attention))) (`compiled.memory_analysis()`, nothing is
run), for the reference kernel (S x S mask + jax.nn.dot_product_attention) and the
blocked kernel (tiles of 128), and bytes per token: constant per token = linear in S.

Table 2 (time): forward+backward (jit(value_and_grad)) at issue 16's S2 attention shape,
B 8, S 512, 8 heads of 32 (d_model 256), float32, median of --rounds alternating rounds
after a warm-up, for two segment layouts: one document per row (causal skipping only)
and four documents per row (causal + document skipping).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.kernels.attention import reference_attention
from emo_jax.kernels.attention_blocked import blocked_attention


def blocked(block: int):
    return lambda q, k, v, s: blocked_attention(q, k, v, s, block, block)


def temp_bytes(kernel, batch: int, seq: int, heads: int, dim: int) -> int:
    q = jax.ShapeDtypeStruct((batch, seq, heads, dim), jnp.float32)
    seg = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(kernel(q, k, v, s)), argnums=(0, 1, 2)))
    return grad.lower(q, q, q, seg).compile().memory_analysis().temp_size_in_bytes


def memory_table(lengths: list[int], heads: int, dim: int) -> None:
    print(f"\ncompiled temp bytes of forward+backward, batch 1, {heads} heads x {dim}, float32")
    print("| S | reference MiB | reference bytes/token | blocked (128) MiB | blocked bytes/token |")
    print("|---|---|---|---|---|")
    for seq in lengths:
        ref = temp_bytes(reference_attention, 1, seq, heads, dim)
        blk = temp_bytes(blocked(128), 1, seq, heads, dim)
        print(f"| {seq} | {ref / 2**20:,.1f} | {ref / seq:,.0f} | {blk / 2**20:,.2f} | {blk / seq:,.0f} |", flush=True)


def segment_layout(batch: int, seq: int, documents: int) -> jax.Array:
    return jnp.asarray(np.broadcast_to(1 + np.arange(seq) * documents // seq, (batch, seq)).astype(np.int32))


def speed_table(batch: int, seq: int, heads: int, dim: int, blocks: list[int], rounds: int) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32) for _ in range(3))
    kernels = {"reference": reference_attention, **{f"blocked {b}": blocked(b) for b in blocks}}
    print(f"\nforward+backward seconds, B {batch}, S {seq}, {heads} heads x {dim}, float32, "
          f"median of {rounds} alternating rounds")
    print("| kernel | 1 document / row (s) | speed-up | 4 documents / row (s) | speed-up |")
    print("|---|---|---|---|---|")
    results = {}
    for documents in (1, 4):
        seg = segment_layout(batch, seq, documents)
        fns = {name: jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v, seg)), argnums=(0, 1, 2)))
               for name, f in kernels.items()}
        for fn in fns.values():
            jax.block_until_ready(fn(q, k, v))
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[name].append(time.perf_counter() - start)
        results[documents] = {name: statistics.median(t) for name, t in times.items()}
    for name in kernels:
        one, four = results[1][name], results[4][name]
        print(f"| {name} | {one:.4f} | {results[1]['reference'] / one:.2f}x | {four:.4f} | "
              f"{results[4]['reference'] / four:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    if not args.skip_memory:
        memory_table(args.lengths, heads=8, dim=32)
    if not args.skip_speed:
        speed_table(8, 512, 8, 32, args.blocks, args.rounds)


if __name__ == "__main__":
    main()
