"""Training-step time, minor page faults and system time of config variants, one process.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_step.py            (S2, ~6 minutes on 2 cores)
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_step.py --variants pool standard --rounds 5

The model is the issue-16 "S2" shape unless overridden: d_model 256, 4 layers, 8 heads of
32, 64 experts (1 shared) top-8, expert hidden 128, vocab 8192, batch 8 x 512, float32,
synthetic packed documents. Every variant is compiled and run once first (not timed);
then `--rounds` rounds run each variant `--steps` steps in turn (alternating, so load
from other processes spreads over all of them), and the table gives the median step
time, the ratio to the first variant, and the minor page faults and system CPU seconds
per step (getrusage of this process around the timed steps).

Variants (config overrides on top of the shape):
  reference_attention   kernels.attention=reference, pool routing
  blocked_attention     kernels.attention=blocked, pool routing
  standard              routing.pool=none (standard top-k routing)
  pool                  routing.pool=random (EMO's document pool)
  pool_two_argsorts     pool, with routing.document_pool replaced by the two stable
                        argsorts it used before issue 16 (for the before/after ratio)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import routing
from emo_jax.config import load_config
from emo_jax.model import build_model
from emo_jax.synthetic import packed_batch
from emo_jax.train import init_train_state, learning_rate_schedule, make_optimizer, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S2 = ("model.d_model=256", "model.n_layers=4", "model.n_heads=8", "model.head_dim=32", "model.n_experts=64",
      "model.n_shared_experts=1", "model.top_k=8", "model.expert_hidden=128", "model.vocab_size=8192",
      "model.max_seq_len=512", "data.seq_len=512", "data.global_batch_size=8", "routing.pool_min=8",
      "routing.pool_max=64")
VARIANTS = {
    "reference_attention": ("kernels.attention=reference", "routing.pool=random"),
    "blocked_attention": ("kernels.attention=blocked", "routing.pool=random"),
    "standard": ("routing.pool=none",),
    "pool": ("routing.pool=random",),
    "pool_two_argsorts": ("routing.pool=random",),
}


def document_pool_two_argsorts(scores, pool_sizes):
    """routing.document_pool as it was before issue 16 (for the before/after row only)."""
    scores = jax.lax.stop_gradient(scores)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < pool_sizes[..., None]


@contextlib.contextmanager
def swapped_document_pool(pool_fn):
    """routing.document_pool replaced by `pool_fn` inside the block (models traced there
    keep it)."""
    saved = routing.document_pool
    routing.document_pool = pool_fn
    try:
        yield
    finally:
        routing.document_pool = saved


def pool_function(variant: str):
    """Swaps in the old pool for the variant that measures it (at trace time only)."""
    if variant != "pool_two_argsorts":
        return contextlib.nullcontext()
    return swapped_document_pool(document_pool_two_argsorts)


def build(variant: str, shape: tuple[str, ...], steps: int):
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), list(shape) + list(VARIANTS[variant]))
    model = build_model(config)
    optimizer = make_optimizer(config.optimizer, 1000)
    state = init_train_state(model, optimizer, config, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, optimizer, config, learning_rate_schedule(config.optimizer, 1000)),
                   donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batches = [packed_batch(rng, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
               for _ in range(steps)]
    with pool_function(variant):
        state, metrics = step(state, batches[0], jax.random.PRNGKey(0))  # compile + first run
        jax.block_until_ready(metrics)
    return {"step": step, "state": state, "batches": batches, "times": [], "faults": [], "sys": []}


def run_steps(entry: dict, key: int) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i, batch in enumerate(entry["batches"]):
        start = time.perf_counter()
        entry["state"], metrics = entry["step"](entry["state"], batch, jax.random.PRNGKey(key + i))
        jax.block_until_ready(metrics)
        entry["times"].append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    n = len(entry["batches"])
    entry["faults"].append((after.ru_minflt - before.ru_minflt) / n)
    entry["sys"].append((after.ru_stime - before.ru_stime) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("overrides", nargs="*", help="extra config overrides (section.key=value)")
    args = parser.parse_args()
    shape = S2 + tuple(args.overrides)
    entries = {name: build(name, shape, args.steps) for name in args.variants}
    for r in range(args.rounds):
        for name, entry in entries.items():
            run_steps(entry, 1000 * r)
    base = statistics.median(entries[args.variants[0]]["times"])
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, "
          f"{args.rounds} rounds x {args.steps} steps, overrides: {' '.join(args.overrides) or '-'}")
    print(f"| variant | step s (median) | vs {args.variants[0]} | minor faults / step | system s / step |")
    print("|---|---|---|---|---|")
    for name, entry in entries.items():
        t = statistics.median(entry["times"])
        print(f"| {name} | {t:.3f} | {t / base:.3f} | {statistics.median(entry['faults']):,.0f} | "
              f"{statistics.median(entry['sys']):.2f} |")


if __name__ == "__main__":
    main()
