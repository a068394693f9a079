"""Cost of the cross-process stop agreement (parallel/agreement.py), as two tables.

Two processes on this machine, 4 CPU devices each (one shell):

  for i in 0 1; do JAX_COORDINATOR_ADDRESS=127.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. \\
    .venv/bin/python benchmarks/bench_agreement.py /tmp/bench_agreement & done; wait

1. One agreement alone: dispatched and read at once, and the loop's way (read one
   iteration later).
2. Training steps/s of configs/tiny.yaml (synthetic data, mesh expert=8 across both
   processes) with an agreement every step vs none (EMO_JAX_STOP_CHECK_EVERY=10**9),
   alternating rounds in the same two processes. Process 0 prints the tables.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def agreement_alone(repeats: int) -> tuple[list[float], float]:
    from emo_jax.parallel.agreement import Agreement
    agreement = Agreement(1, force_collective=True)
    agreement([0])  # compile
    blocking = []
    for _ in range(repeats):
        start = time.perf_counter()
        agreement([0])
        blocking.append(time.perf_counter() - start)
    start = time.perf_counter()
    handle = agreement.start([0])
    for _ in range(repeats):
        previous, handle = handle, agreement.start([0])
        agreement.result(previous)
    return blocking, (time.perf_counter() - start) / repeats


def train_steps_per_second(run_dir: Path, every: int, steps: int) -> float:
    from emo_jax.config import load_config
    from emo_jax.train import loop
    os.environ["EMO_JAX_STOP_CHECK_EVERY"] = str(every)
    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"train.run_dir={run_dir}", f"train.steps={steps}", "train.log_every=10", "train.checkpoint_every=0",
        "train.eval_every=0", "train.progress_bar=false", "mesh.data=1", "mesh.expert=8"])
    loop.train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    rates = [r["steps_per_second"] for r in rows if r["split"] == "train"][1:]  # the first holds compilation
    return statistics.mean(rates) if rates else float("nan")


def main(work: Path, repeats: int = 200, rounds: int = 3, steps: int = 60) -> None:
    from emo_jax.parallel.distributed import maybe_initialize_distributed
    maybe_initialize_distributed()
    import jax
    blocking, overlapped = agreement_alone(repeats)
    rates: dict[int, list[float]] = {1: [], 10**9: []}
    for r in range(rounds):
        for every in (1, 10**9) if r % 2 == 0 else (10**9, 1):
            rates[every].append(train_steps_per_second(work / f"round{r}_every{every}", every, steps))
    if jax.process_index() == 0:
        print(f"\n{jax.process_count()} processes x {jax.local_device_count()} {jax.devices()[0].platform} devices")
        print(f"| agreement alone ({repeats}x) | median ms | mean ms |\n|---|---|---|")
        print(f"| dispatch + read (blocking) | {1e3 * statistics.median(blocking):.3f} | "
              f"{1e3 * statistics.mean(blocking):.3f} |")
        print(f"| read one iteration later | - | {1e3 * overlapped:.3f} |")
        print(f"\n| tiny.yaml, {steps} steps | steps/s per round | mean |\n|---|---|---|")
        for every, name in ((1, "agreement every step"), (10**9, "no agreement")):
            print(f"| {name} | {', '.join(f'{v:.2f}' for v in rates[every])} | {statistics.mean(rates[every]):.2f} |")
        print(f"ratio every step / none: {statistics.mean(rates[1]) / statistics.mean(rates[10**9]):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench_agreement"))
