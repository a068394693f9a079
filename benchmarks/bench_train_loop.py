"""Train-loop steps/s: metrics read every step (the old loop) vs one step late, as a table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
    .venv/bin/python benchmarks/bench_train_loop.py --rounds 3 --steps 60

Runs `emo_jax.train.loop.train` on configs/tiny.yaml with synthetic data, alternating
metrics_delay=0 (the host reads step t's loss before dispatching step t+1, as the loop
did before) and metrics_delay=1 (read after step t+1 is dispatched), in one process.
Steps/s is the mean over the log windows after the first (the first holds compilation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps_per_second(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_second"] for r in rows if r["split"] == "train"][1:]
    return statistics.mean(rates)


def one_run(delay: int, steps: int, log_every: int, work: Path, index: int, extra: list[str]) -> float:
    from emo_jax.config import load_config
    from emo_jax.train import loop
    run_dir = work / f"run{index}_delay{delay}"
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.log_every={log_every}",
        "train.checkpoint_every=0", "train.eval_every=0", "train.progress_bar=false", *extra])
    loop.train(config, metrics_delay=delay)
    return steps_per_second(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. mesh.data=8")
    args = parser.parse_args()
    results: dict[int, list[float]] = {0: [], 1: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for delay in (0, 1) if r % 2 == 0 else (1, 0):
                results[delay].append(one_run(delay, args.steps, args.log_every, Path(tmp), r, args.overrides))
    import jax
    print(f"\n{jax.device_count()} x {jax.devices()[0].device_kind}, tiny.yaml, {args.steps} steps, "
          f"{args.rounds} alternating rounds")
    print("| metrics read | steps/s per round | mean |")
    print("|---|---|---|")
    for delay, name in ((0, "every step (before)"), (1, "one step late (after)")):
        values = results[delay]
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} |")
    print(f"ratio after/before: {statistics.mean(results[1]) / statistics.mean(results[0]):.3f}")


if __name__ == "__main__":
    main()
