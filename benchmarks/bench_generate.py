"""Decoding speed of `emo_jax.generate` by sampling mode, as a table.

  bash -c 'source launch/allocator.sh; emo_preload_allocator; PYTHONPATH=. JAX_PLATFORMS=cpu \\
      .venv/bin/python benchmarks/bench_generate.py'      (S1 and S2, about a minute)
  ... benchmarks/bench_generate.py --batch 1 0           (one prompt, then the shape's batch)

Shapes and weights are `bench_vs_torch.py`'s (issue 16's S1 and S2, random init, standard
routing: generation never uses a document pool), prompts of --prompt-len tokens, batch as
the shape's. Rows: greedy (temperature 0), temperature 1 over the whole vocabulary
(top_p 1) and temperature 1 with a top-p 0.9 nucleus. Columns: the whole `generate` call
for --new-tokens tokens (prefill, decode scan, host side; median of --repeats calls after
one untimed call that compiles), and the cost of one decode step, from the difference
between --new-tokens and a 1-token call.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_torch import SHAPES, batches, emo_config  # noqa: E402

from emo_jax.accelcheck.timing import time_call  # noqa: E402
from emo_jax.generate import SamplingConfig, generate  # noqa: E402
from emo_jax.model import build_model  # noqa: E402
from emo_jax.train.optimizer import make_optimizer  # noqa: E402
from emo_jax.train.step import init_train_state  # noqa: E402

MODES = {"greedy": (0.0, 1.0), "t=1, top_p=1": (1.0, 1.0), "t=1, top_p=0.9": (1.0, 0.9)}


def median_seconds(fn, repeats: int) -> float:
    """Median of `repeats` calls of fn() after one untimed call (compile)."""
    return time_call(fn, (), repeats, cap_s=float("inf"), guard=False)["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["S1", "S2"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[0],
                        help="prompts per call; 0 = the shape's batch (several: one table row set each)")
    args = parser.parse_args()
    print(f"emo_jax.generate; jax {jax.__version__} on {jax.default_backend()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; median of {args.repeats} calls")
    for shape in args.shapes:
        config = emo_config(shape, pooled=False, extra_positions=args.prompt_len + args.new_tokens)
        params = init_train_state(build_model(config), make_optimizer(config.optimizer, 10), config,
                                  jax.random.PRNGKey(0)).params
        rows = [list(map(int, row)) for row in np.asarray(batches(shape)[0]["inputs"])[:, :args.prompt_len]]
        for batch in args.batch:
            prompts = rows[:batch or len(rows)]
            print(f"\n=== {shape}: batch {len(prompts)}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
            table(config, params, prompts, args)


def table(config, params, prompts, args) -> None:
    """One row per sampling mode: the whole call, tokens/s, and ms per decode step."""
    print(f"{'mode':16s} {'call ms':>9s} {'tokens/s':>9s} {'ms / decode step':>17s}")
    for mode, (temperature, top_p) in MODES.items():
        def call(n):
            sampling = SamplingConfig(max_new_tokens=n, temperature=temperature, top_p=top_p, eos_id=None)
            return lambda: generate(config, params, prompts, sampling)
        whole = median_seconds(call(args.new_tokens), args.repeats)
        one = median_seconds(call(1), args.repeats)
        step = (whole - one) / max(1, args.new_tokens - 1)
        print(f"{mode:16s} {whole * 1e3:9.1f} {len(prompts) * args.new_tokens / whole:9.0f} {step * 1e3:17.2f}")


if __name__ == "__main__":
    main()
