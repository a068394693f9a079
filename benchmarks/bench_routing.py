"""Cost of EMO's document pool over standard routing, per MoE layer, forward+backward.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_routing.py        (~1 minute on 2 cores)

`routing.route` at issue 16's S2 shape (B 8, S 512, 63 routed experts, top-7 routed,
G = S + 1 segment slots, pool sizes UniformInt[8, 64], 4 documents per row), as
jit(value_and_grad) of the gates and probabilities, for: standard routing (no pool), the
pool (ranks by counting, now), the pool with one sort of every slot (issue 16, first
version) and with the two stable argsorts it used before issue 16.
Median of --rounds alternating rounds. The pool's overhead over standard routing is
(pool - standard) x layers; divide by a measured standard training step
(benchmarks/bench_step.py) for its share of the step (--step-seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import routing
from bench_step import document_pool_two_argsorts, swapped_document_pool  # benchmarks/ is on sys.path


def document_pool_one_sort(scores, pool_sizes):
    """routing.document_pool with one sort of every slot (the d-th largest score as a
    threshold, ties by index): issue 16's first replacement of the two argsorts."""
    scores = jax.lax.stop_gradient(scores)
    size = jnp.clip(pool_sizes, 0, scores.shape[-1])[..., None]
    descending = -jnp.sort(-scores, axis=-1)
    threshold = jnp.take_along_axis(descending, jnp.maximum(size - 1, 0), axis=-1)
    above, tied = scores > threshold, scores == threshold
    room = size - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    return (above | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=-1) <= room))) & (size > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--step-seconds", type=float, default=None, help="a measured standard-routing step")
    args = parser.parse_args()
    batch, seq, n_routed, k_r = 8, 512, 63, 7
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(batch, seq, n_routed)), jnp.float32)
    segs = jnp.asarray(np.broadcast_to(1 + np.arange(seq) * 4 // seq, (batch, seq)).astype(np.int32))
    sizes = routing.draw_pool_sizes(jax.random.PRNGKey(0), (batch, seq + 1), 8, 64)

    def objective(pool_sizes):
        def f(z):
            r = routing.route(z, segs, k_r, pool_sizes, num_segments=seq + 1)
            return jnp.sum(r.gates) + jnp.sum(r.probs * r.probs) + jnp.sum(r.stats.router_z_sum)
        return jax.jit(jax.value_and_grad(f))

    fns = {"standard": objective(None), "pool (ranks by counting)": objective(sizes)}
    for name, pool_fn in (("pool (one sort)", document_pool_one_sort),
                          ("pool (two argsorts, before)", document_pool_two_argsorts)):
        with swapped_document_pool(pool_fn):
            fns[name] = objective(sizes)
            jax.block_until_ready(fns[name](logits))  # traced with this pool function
    for fn in fns.values():
        jax.block_until_ready(fn(logits))
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(logits))
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; route() forward+backward, B {batch}, S {seq}, "
          f"N {n_routed}, k_r {k_r}; median of {args.rounds} alternating rounds")
    share = f" | overhead / step ({args.step_seconds:.2f} s)" if args.step_seconds else ""
    print(f"| routing | ms per layer | overhead vs standard, {args.layers} layers (ms){share} |")
    print("|---|---|---|" + ("---|" if share else ""))
    for name, t in med.items():
        extra = (t - med["standard"]) * args.layers
        cell = f" | {100 * extra / args.step_seconds:.2f}%" if args.step_seconds else ""
        print(f"| {name} | {1000 * t:.2f} | {1000 * extra:.1f}{cell} |")


if __name__ == "__main__":
    main()
