"""Input-pipeline throughput (tokens/s) on this machine, printed as a table.

  .venv/bin/python benchmarks/bench_data.py --data-dir data_cache --seconds 10
(needs a built dataset: `emo-jax data build`; about 1-2 minutes with the defaults)

Measures packed tokens per second delivered by the grain iterator (tokenizing, packing,
batching) for a few settings of threads and worker processes, after a warm-up batch.
"""

from __future__ import annotations

import argparse
import os
import time

from emo_jax.data import pipeline
from emo_jax.data.tokenizer import load_tokenizer


def measure(source, tokenizer, cfg: pipeline.PipelineConfig, seconds: float) -> tuple[float, int]:
  """(tokens/s, batches) over about `seconds` after the first batch."""
  it = iter(pipeline.build_dataset(source.records, source.domains, tokenizer, cfg))
  next(it)  # warm-up: thread pools, worker processes, first tokenizer load
  tokens, batches, start = 0, 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    tokens += batch["inputs"].size
    batches += 1
  return tokens / (time.perf_counter() - start), batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default="data_cache")
  parser.add_argument("--dataset", default="emo_corpus")
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--batch-size", type=int, default=8, help="rows per host")
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--settings", nargs="+", default=["1:0", "2:0", "4:0", "1:2"],
                      help="THREADS:WORKERS pairs to measure (default: %(default)s)")
  args = parser.parse_args()

  source = pipeline.open_data_source(args.data_dir, args.dataset, "train")
  tokenizer = load_tokenizer(source.dataset_dir)
  rows = [("threads", "workers", "seq_len", "batch", "batches", "tokens/s")]
  for setting in args.settings:
    threads, workers = (int(x) for x in setting.split(":"))
    cfg = pipeline.PipelineConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=0,
                                  num_threads=threads, num_workers=workers)
    rate, batches = measure(source, tokenizer, cfg, args.seconds)
    rows.append((str(threads), str(workers), str(args.seq_len), str(args.batch_size), str(batches), f"{rate:,.0f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  print(f"dataset {source.dataset_dir}, {os.cpu_count()} CPU cores")
  for i, row in enumerate(rows):
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    if i == 0:
      print("  ".join("-" * w for w in widths))


if __name__ == "__main__":  # worker processes re-import this module
  main()
