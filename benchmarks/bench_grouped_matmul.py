"""Expert SwiGLU over expert-sorted rows: the grouped-matmul formulations against a
dense SwiGLU of the same FLOPs, forward and forward + both gradients, as a table.

  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_grouped_matmul.py
  ... --shape S1 --rounds 7 --ragged        (ragged_dot is E times the work on CPU: opt-in)

Shapes (issue 16): S2 = 8 x 512 tokens, d 256, 64 experts top-8, expert hidden 128
(M = 32768 rows); S1 = 16 x 256 tokens, d 128, 32 experts top-4, hidden 64.
Routing: "uniform" (each token's top-k of uniform random scores, what an untrained
router gives), "moderate" (popularity ~ 1/(rank+1)^0.05: the largest group about twice
the mean, ~12% of copies past a capacity of the mean, like the per-step load of a trained
router in the reproduction runs, whose largest expert load is ~2x the mean) and "skewed"
(popularity ~ 1/(rank+1)^0.7: the largest group is several times the mean).

Rows, each the whole SwiGLU (three matmuls) on the same sorted rows:
  dense            one [M, D] x [D, H] SwiGLU (expert 0's weights for every row): the bar
  capacity cf=X    `kernels.capacity` (batched einsum over an [E, C, D] slab,
                   C = X x mean rows per expert, overflow in while loops over blocks
                   of 512, 256, 128, 64 and 32 rows)
    overflow R=..  the same at cf=1.0 with other overflow block sizes (R=32: one
                   size, the default before the tiers)
  blocked R=X      `kernels.blocked` (lax.scan over X-row expert-aligned blocks with cond)
  gathered R=128   aligned blocks, weights gathered per block, one batched einsum
  ragged_dot       `jax.lax.ragged_dot` (the reference backend), with --ragged
Second table, the whole routed FFN from tokens to tokens (dispatch, SwiGLU, combine,
gates; T tokens, each to K experts) against the same dense SwiGLU over M = T*K rows:
  dense            as above (no dispatch, no combine: the bar)
  capacity layer   `kernels.capacity.moe_ffn_capacity` (the CPU default backend's
                   layer): the slab gathered from the tokens, the slab SwiGLU, each
                   copy's output gathered from the slab and summed with its gates,
                   overflow copies scatter-added per token
Rounds alternate between the rows (one process, compile excluded); medians shown, of
wall time and of the process's CPU time (all threads: on a machine shared with other
jobs the CPU time is the steadier measure of the work; GFLOP/s counts the useful
3 x 2 M D H x 3 FLOPs of forward + both gradients per wall second).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from emo_jax.kernels import blocked, capacity, reference

SHAPES = {"S1": (16 * 256, 4, 128, 64, 32), "S2": (8 * 512, 8, 256, 128, 64)}  # T, K, D, H, E


def routed_ids(kind: str, tokens: int, k: int, e: int, key) -> jax.Array:
    """i32[T, K]: each token's top-k experts under the named routing."""
    scores = jax.random.uniform(key, (tokens, e))
    if kind == "moderate":
        scores = scores * (1.0 / (jnp.arange(e) + 1.0) ** 0.05)
    if kind == "skewed":
        scores = scores * (1.0 / (jnp.arange(e) + 1.0) ** 0.7)
    return jnp.argsort(-scores, axis=-1)[:, :k].astype(jnp.int32)


def dense_swiglu(x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array) -> jax.Array:
    """The bar: one [M, D] x [D, H] SwiGLU with expert 0's weights for every row."""
    return (jax.nn.silu(x @ wg[0]) * (x @ wu[0])) @ wd[0]


def _gathered(lhs, rhs, gs, block_rows=128):
    dest, be, _ = blocked.aligned_layout(gs, lhs.shape[0], block_rows)
    nb = be.shape[0]
    buf = jnp.zeros((nb * block_rows + 1, lhs.shape[1]), lhs.dtype).at[dest].set(lhs)
    y = jnp.einsum("nra,nab->nrb", buf[:-1].reshape(nb, block_rows, -1), rhs[be])
    return jnp.concatenate([y.reshape(nb * block_rows, -1), jnp.zeros((1, y.shape[-1]), y.dtype)])[dest]


def formulations(ragged: bool) -> dict:
    swiglu = lambda mm: functools.partial(reference.grouped_swiglu, matmul=mm)
    rows = {
        "dense": lambda x, wg, wu, wd, gs: dense_swiglu(x, wg, wu, wd),
        "capacity cf=1.0": functools.partial(capacity.grouped_swiglu_capacity, capacity_factor=1.0),
        "  overflow R=32": functools.partial(capacity.grouped_swiglu_capacity, block_rows=32),
        "  overflow R=256,32": functools.partial(capacity.grouped_swiglu_capacity, block_rows=(256, 32)),
        "  overflow R=256..32": functools.partial(capacity.grouped_swiglu_capacity, block_rows=(256, 128, 64, 32)),
        "  overflow R=512..32": functools.partial(capacity.grouped_swiglu_capacity,
                                                  block_rows=(512, 256, 128, 64, 32)),
        "capacity cf=1.125": functools.partial(capacity.grouped_swiglu_capacity, capacity_factor=1.125),
        "capacity cf=1.25": functools.partial(capacity.grouped_swiglu_capacity, capacity_factor=1.25),
        "blocked R=128": swiglu(functools.partial(blocked.grouped_matmul_blocked, block_rows=128)),
        "blocked R=512": swiglu(functools.partial(blocked.grouped_matmul_blocked, block_rows=512)),
        "gathered R=128": swiglu(_gathered),
    }
    if ragged:
        rows["ragged_dot"] = swiglu(reference.grouped_matmul)
    return rows


def time_rows(fns: dict, args: tuple, rounds: int) -> tuple[dict, dict]:
    """fns: name -> (forward, value_and_grad), both jitted on `args`. Alternating
    rounds after one compile + warm-up call each -> medians (wall, CPU) per name,
    each [forward, forward + backward] in seconds."""
    for pair in fns.values():
        for fn in pair:
            jax.block_until_ready(fn(*args))
    wall = {name: ([], []) for name in fns}
    cpu = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, pair in fns.items():
            for i, fn in enumerate(pair):
                start, start_cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn(*args))
                wall[name][i].append(time.perf_counter() - start)
                cpu[name][i].append(time.process_time() - start_cpu)
    med = lambda table: {n: [statistics.median(v) for v in pair] for n, pair in table.items()}  # noqa: E731
    return med(wall), med(cpu)


def print_table(wall: dict, cpu: dict, flops: float) -> None:
    print(f"{'formulation':20s} {'fwd ms':>8s} {'vs dense':>9s} {'fwd+bwd ms':>11s} {'vs dense':>9s} "
          f"{'GFLOP/s':>8s} | {'CPU-s fwd':>9s} {'vs dense':>9s} {'CPU-s f+b':>9s} {'vs dense':>9s}")
    for name in wall:
        (f_, b_), (cf_, cb_) = wall[name], cpu[name]
        print(f"{name:20s} {f_ * 1e3:8.1f} {f_ / wall['dense'][0]:8.2f}x {b_ * 1e3:11.1f} "
              f"{b_ / wall['dense'][1]:8.2f}x {3 * flops / b_ / 1e9:8.1f} | {cf_:9.3f} "
              f"{cf_ / cpu['dense'][0]:8.2f}x {cb_:9.3f} {cb_ / cpu['dense'][1]:8.2f}x")


def sorted_rows_table(x, wg, wu, wd, ct, gs, ragged: bool, rounds: int) -> tuple[dict, dict]:
    """Each formulation on the same expert-sorted rows x [M, D]."""
    fns = {}
    for name, f in formulations(ragged).items():
        loss = lambda x, wg, wu, wd, ct, gs, f=f: jnp.sum(f(x, wg, wu, wd, gs) * ct)  # noqa: E731
        # Every array is an argument (a closed-over array would be constant-folded).
        fns[name] = (jax.jit(lambda x, wg, wu, wd, ct, gs, f=f: f(x, wg, wu, wd, gs)),
                     jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))))
    return time_rows(fns, (x, wg, wu, wd, ct, gs), rounds)


def token_ffn_table(x, tok, ids, gates, wg, wu, wd, ct, ct_tok, rounds: int) -> tuple[dict, dict]:
    """The routed FFN from tokens tok [T, D] (ids, gates [T, K]) against the dense
    SwiGLU over x [M, D]; gradients w.r.t. the input, the gates and the three weights."""
    valid = jnp.ones(tok.shape[0], bool)
    dense = dense_swiglu
    fns = {"dense": (jax.jit(lambda x, tok, g, wg, wu, wd, ct, ctt, ids: dense(x, wg, wu, wd)),
                     jax.jit(jax.value_and_grad(lambda x, tok, g, wg, wu, wd, ct, ctt, ids:
                                                jnp.sum(dense(x, wg, wu, wd) * ct), argnums=(0, 3, 4, 5))))}
    for name, ffn in (("capacity layer", capacity.moe_ffn_capacity),):
        run = lambda tok, g, wg, wu, wd, ids, ffn=ffn: ffn(tok, ids, g, valid, wg, wu, wd)  # noqa: E731
        fns[name] = (jax.jit(lambda x, tok, g, wg, wu, wd, ct, ctt, ids, run=run: run(tok, g, wg, wu, wd, ids)),
                     jax.jit(jax.value_and_grad(lambda x, tok, g, wg, wu, wd, ct, ctt, ids, run=run:
                                                jnp.sum(run(tok, g, wg, wu, wd, ids) * ctt),
                                                argnums=(1, 2, 3, 4, 5))))
    return time_rows(fns, (x, tok, gates, wg, wu, wd, ct, ct_tok, ids), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="S2")
    parser.add_argument("--routing", choices=["uniform", "moderate", "skewed"], nargs="+",
                        default=["uniform", "moderate", "skewed"])
    parser.add_argument("--tables", choices=["sorted", "tokens"], nargs="+", default=["sorted", "tokens"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ragged", action="store_true", help="also time ragged_dot (E x the work on CPU)")
    args = parser.parse_args()
    t, k, d, h, e = SHAPES[args.shape]
    m = t * k
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jax.random.normal(keys[0], (m, d))
    wg, wu = (jax.random.normal(kk, (e, d, h)) * d ** -0.5 for kk in keys[1:3])
    wd = jax.random.normal(keys[3], (e, h, d)) * h ** -0.5
    ct = jax.random.normal(keys[4], (m, d))
    tok = jax.random.normal(keys[6], (t, d))
    ct_tok = jax.random.normal(keys[7], (t, d))
    gates = jax.nn.softmax(jax.random.normal(keys[5], (t, k)), axis=-1)
    flops = 2 * m * d * h * 3
    print(f"expert SwiGLU, shape {args.shape}: T={t} tokens x K={k} = M={m} rows, D={d}, H={h}, E={e}; "
          f"{jax.device_count()} x {jax.default_backend()}, jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}; {args.rounds} alternating rounds, medians")
    for kind in args.routing:
        ids = routed_ids(kind, t, k, e, keys[5])
        gs = jnp.bincount(ids.reshape(-1), length=e).astype(jnp.int32)
        print(f"\nrouting {kind}: largest group {int(gs.max())}, mean {m / e:.0f} "
              f"({float(gs.max()) / (m / e):.2f}x)")
        if "sorted" in args.tables:
            print("-- the SwiGLU over expert-sorted rows [M, D] (the grouped-matmul contract)")
            print_table(*sorted_rows_table(x, wg, wu, wd, ct, gs, args.ragged, args.rounds), flops)
        if "tokens" in args.tables:
            print("-- the routed FFN from tokens [T, D] to tokens (dispatch + SwiGLU + combine) vs dense over [M, D]")
            print_table(*token_ffn_table(x, tok, ids, gates, wg, wu, wd, ct, ct_tok, args.rounds), flops)


if __name__ == "__main__":
    main()
