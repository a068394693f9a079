"""One training process for tests/test_multiprocess.py (not a test module).

    python tests/multiprocess_worker.py --out OUT.json --batch-log LOG.jsonl
        [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id I] [--emulate-processes 2]
        -- CONFIG.yaml key=value ...

Runs `emo_jax.train.loop.train` as `emo-jax train` does, and records, per step, a
SHA-256 of every row this process fed (the batch log), so the test can check which
documents each process consumed across interruptions. --emulate-processes N: a
single-process run whose batch is the concatenation of the N data shards that N
processes would read, in process order: the same global batch as an N-process run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-log", required=True)
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--emulate-processes", type=int, default=1)
    parser.add_argument("--init-timeout", type=float, default=60)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


class ConcatenatedShards:
    """The batches of `count` processes' data shards, concatenated along the rows."""

    def __init__(self, config, count: int):
        from emo_jax.train.batches import PipelineBatches
        self.shards = [PipelineBatches(config, i, count) for i in range(count)]
        self.domains = self.shards[0].domains

    def __next__(self) -> dict:
        import numpy as np
        parts = [next(s) for s in self.shards]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        return {"shards": [s.get_state() for s in self.shards]}

    def set_state(self, state: dict) -> None:
        for s, st in zip(self.shards, state["shards"]):
            s.set_state(st)


class LoggedBatches:
    """Wraps a batch source; appends {"step", "rows": [sha256 of each row's input tokens]} per batch."""

    def __init__(self, source, path: Path, step_of):
        self.source, self.path, self.step_of = source, path, step_of
        self.domains = source.domains

    def __next__(self) -> dict:
        batch = next(self.source)
        rows = [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in batch["inputs"]]
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": self.step_of(), "rows": rows}) + "\n")
        return batch

    def get_state(self) -> dict:
        return self.source.get_state()

    def set_state(self, state: dict) -> None:
        self.source.set_state(state)


def main() -> int:
    args = _args()
    from emo_jax.parallel import distributed
    if args.num_processes > 1:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout)
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    from emo_jax.config import load_config
    from emo_jax.train import batches, loop

    config = load_config(args.config, args.overrides)
    current = {"step": 0}
    dispatch, original_batches = loop.dispatch_step, batches.train_batches

    def dispatch_step(run):
        current["step"] = run.step + 1  # the step the next batch is for (1-based)
        return dispatch(run)

    def train_batches(cfg):
        source = ConcatenatedShards(cfg, args.emulate_processes) if args.emulate_processes > 1 \
            else original_batches(cfg)
        return LoggedBatches(source, Path(args.batch_log), lambda: current["step"])

    loop.dispatch_step = dispatch_step
    batches.train_batches = train_batches
    result = loop.train(config)
    Path(args.out).write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "final_step": result.final_step, "losses": result.losses, "signal": result.signal_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
