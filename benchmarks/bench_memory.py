"""Parameter bytes and peak inference memory: full emo_1b14b and its 32- and 16-expert subsets.

  python benchmarks/bench_memory.py                          # estimate from shapes (seconds, any machine)
  python benchmarks/bench_memory.py --measure                # + measured peak on a GPU/TPU (minutes)
  python benchmarks/bench_memory.py --config configs/tiny.yaml --experts 8 5 --seq-len 128

The estimate is `emo_jax.memory` (weights + KV cache + largest transient + residual).
--measure runs, for each expert count in its own process (XLA's peak counter cannot
be reset), bf16 weights initialised on the device and `emo_jax.generate` over batch x
(seq_len - 8) prompt tokens + 8 new ones, and reads the device's peak_bytes_in_use.
A pruned model keeping K experts in every layer has the shapes of a model with
n_experts = K, so the measurement builds that model directly. On CPU there is no
device peak counter: the measured column stays "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from emo_jax.config import load_config
from emo_jax.memory import format_table, memory_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_one(config_path: str, experts: int, batch: int, seq_len: int) -> int | None:
    """Peak device bytes of one generation with `experts` experts per layer (None on CPU)."""
    import jax
    import numpy as np
    from emo_jax.generate import SamplingConfig, generate
    from emo_jax.model import build_model
    from emo_jax.train.step import init_params

    config = load_config(config_path, [f"model.n_experts={experts}", "model.param_dtype=bfloat16",
                                       "model.dtype=bfloat16", "model.remat=none", "routing.pool=none",
                                       "mesh.expert=1", "data.seq_len=8"])
    device = jax.devices()[0]
    if device.platform == "cpu" or device.memory_stats() is None:
        return None
    params = jax.jit(lambda key: init_params(build_model(config), config, key))(jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch, seq_len - 8)).tolist()
    generate(config, params, prompts, SamplingConfig(max_new_tokens=8))
    return int(device.memory_stats()["peak_bytes_in_use"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "emo_1b14b.yaml"))
    parser.add_argument("--experts", type=int, nargs="+", default=[128, 32, 16])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--weight-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--measure", action="store_true", help="also measure on the accelerator")
    parser.add_argument("--measure-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure_one is not None:
        print(json.dumps({"peak": measure_one(args.config, args.measure_one, args.batch, args.seq_len)}))
        return 0
    config = load_config(args.config)
    rows = memory_rows(config.model, tuple(args.experts), args.batch, args.seq_len, args.weight_dtype,
                       config.kernels.attention)
    measured = {}
    if args.measure:
        for experts in args.experts:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--measure-one", str(experts),
                                  "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
                                 capture_output=True, text=True, check=True)
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
            if peak is not None:
                measured[experts] = peak
    print(format_table(config.name, rows, args.batch, args.seq_len, args.weight_dtype, measured))
    if args.measure and not measured:
        print("\nmeasured: n/a (no accelerator with a peak-memory counter on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
