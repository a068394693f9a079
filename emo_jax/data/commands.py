"""`emo-jax data build` and `emo-jax data stats`: argparse entry points returning exit codes."""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import tqdm

from emo_jax.data import corpus_builder, sources
from emo_jax.data.pipeline import open_data_source, resolve_dataset_dir
from emo_jax.data.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_bpe


def _build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="emo-jax data build",
    description="Build the bundled multi-domain corpus (default) or a dataset from your own "
                ".txt/.jsonl files, then train its byte-level BPE tokenizer.")
  p.add_argument("--data-dir", default=str(corpus_builder.default_data_dir()), help="TFDS data directory (default: %(default)s)")
  p.add_argument("--inputs", nargs="+", default=None, metavar="FILE",
                 help="your .jsonl (one document per line, 'text' and optional 'domain') or other text files (one document each)")
  p.add_argument("--name", default="default", help="config name: the dataset goes to DATA_DIR/<builder>/<name>/")
  p.add_argument("--default-domain", default="default", help="domain of documents without one (--inputs only)")
  p.add_argument("--domains", nargs="+", default=list(sources.DOMAINS), choices=sources.DOMAINS, help="bundled corpus domains")
  p.add_argument("--max-bytes-per-domain", type=int, default=3_000_000, help="cap per domain (default: %(default)s)")
  p.add_argument("--validation-fraction", type=float, default=0.05, help="fraction of documents in validation (default: %(default)s)")
  p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
  p.add_argument("--tokenizer", default=None, metavar="PATH",
                 help="use this local tokenizer.json instead of training one (copied next to the dataset)")
  p.add_argument("--force", action="store_true", help="delete an existing build of the same name first")
  return p


def _train_texts(records, desc: str) -> Iterator[str]:
  for i in tqdm.trange(len(records), desc=desc, unit="doc"):
    yield records[i]["text"].decode("utf-8", errors="replace")


def build_main(argv: list[str]) -> int:
  args = _build_parser().parse_args(argv)
  start = time.perf_counter()
  if args.inputs:
    config = corpus_builder.TextFilesConfig(
      name=args.name, paths=tuple(args.inputs), validation_fraction=args.validation_fraction,
      default_domain=args.default_domain)
    builder = corpus_builder.text_files_builder(args.data_dir, config)
  else:
    config = corpus_builder.EmoCorpusConfig(
      name=args.name, max_bytes_per_domain=args.max_bytes_per_domain,
      validation_fraction=args.validation_fraction, domains=tuple(args.domains))
    builder = corpus_builder.emo_corpus_builder(args.data_dir, config)
  target = pathlib.Path(builder.data_dir)
  if args.force and target.exists():
    shutil.rmtree(target)
  try:
    directory = corpus_builder.build(builder)
  except (ValueError, FileNotFoundError, RuntimeError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1

  if args.tokenizer:
    tok = load_tokenizer(args.tokenizer)  # validates the file and its EOS/PAD tokens
    shutil.copyfile(tok.path, directory / TOKENIZER_FILE)
  else:
    train = open_data_source(args.data_dir, str(directory), "train").records
    tok_path = save_tokenizer(train_bpe(_train_texts(train, "training tokenizer"), vocab_size=args.vocab_size), directory)
    tok = load_tokenizer(tok_path)
  print(f"dataset: {directory}")
  print(f"tokenizer: {directory / TOKENIZER_FILE} (vocab {tok.vocab_size}, eos {tok.eos_id}, pad {tok.pad_id})")
  print(f"built in {time.perf_counter() - start:.1f}s")
  return 0


def _stats_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="emo-jax data stats",
    description="Documents, tokens and bytes per domain and split; with --config, how the training "
                "batches of that config mix the domains (with and without the row shuffle).")
  p.add_argument("--data-dir", default=None,
                 help=f"TFDS data directory (default: the config's data.data_dir, else {corpus_builder.default_data_dir()})")
  p.add_argument("--dataset", default=None,
                 help="name[/config[/version]] under DATA_DIR, or a dataset directory (default: the config's data.dataset, else emo_corpus)")
  p.add_argument("--tokenizer", default=None, metavar="PATH", help="tokenizer.json (default: the config's, else the one stored with the dataset)")
  p.add_argument("--config", default=None, metavar="PATH",
                 help="a training config: report the domain mix of its first --batches training batches "
                      "(data.seq_len, global_batch_size, seed, shuffle_rows) next to data.shuffle_rows=0")
  p.add_argument("--batches", type=int, default=50, help="training batches to measure with --config (default: %(default)s)")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
  return p


def count_split(records, tokenizer, domains, batch: int = 256) -> dict[str, dict[str, int]]:
  """Per domain: documents, tokens (EOS included) and UTF-8 bytes of one split."""
  counts: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "tokens": 0, "bytes": 0})
  for start in tqdm.trange(0, len(records), batch, desc="counting", unit="batch", leave=False):
    recs = [records[i] for i in range(start, min(start + batch, len(records)))]
    texts = [r["text"].decode("utf-8", errors="replace") for r in recs]
    for rec, text, ids in zip(recs, texts, tokenizer.encode_batch(texts)):
      c = counts[rec["domain"].decode()]
      c["documents"] += 1
      c["tokens"] += len(ids) + 1
      c["bytes"] += len(rec["text"])
  return {d: counts[d] for d in domains if d in counts}


def format_table(rows: list[tuple[str, ...]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def mixing_stats(config, *, data_dir: str, dataset: str, tokenizer_path: str | None, num_batches: int) -> dict:
  """Domain mix of the first `num_batches` training batches of `config` (one host, as
  training on one host builds them), with its data.shuffle_rows and with 0, and the
  ideal of rows drawn iid from the train split's token shares."""
  import numpy as np

  from emo_jax.data import mixing
  from emo_jax.data.pipeline import make_train_iterator

  c = config.data
  source = open_data_source(data_dir, dataset, "train")
  tokenizer = load_tokenizer(tokenizer_path or source.dataset_dir)
  per_domain = count_split(source.records, tokenizer, source.domains)
  corpus = np.array([per_domain.get(d, {"tokens": 0})["tokens"] for d in source.domains], np.float64)
  corpus_shares = mixing.shares(corpus)
  columns = {}
  for shuffle_rows in dict.fromkeys((c.shuffle_rows, 0)):  # the config's first; once if it is 0
    iterator = make_train_iterator(
      data_dir, dataset, seq_len=c.seq_len, global_batch_size=c.global_batch_size, seed=c.seed,
      tokenizer_path=tokenizer_path, process_index=0, process_count=1, shuffle_rows=shuffle_rows)
    batches = (next(iterator) for _ in tqdm.trange(num_batches, desc=f"shuffle_rows={shuffle_rows}", unit="batch", leave=False))
    columns[f"shuffle_rows={shuffle_rows}"] = mixing.batch_mixing(batches, len(source.domains), corpus_shares)
  columns["iid rows (ideal)"] = mixing.iid_rows_reference(corpus_shares, c.global_batch_size)
  return {
    "config": getattr(config, "name", None), "dataset": str(source.dataset_dir), "split": "train",
    "seq_len": c.seq_len, "global_batch_size": c.global_batch_size, "seed": c.seed, "batches": num_batches,
    "corpus_token_shares": {d: float(s) for d, s in zip(source.domains, corpus_shares)},
    "columns": columns,
  }


def _mixing_main(args) -> int:
  from emo_jax.config import ConfigError, load_config
  from emo_jax.data import mixing

  if args.batches < 1:
    print(f"error: --batches must be positive, got {args.batches}", file=sys.stderr)
    return 1
  try:
    config = load_config(args.config)
  except ConfigError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  data_dir = args.data_dir or config.data.data_dir
  dataset = args.dataset or config.data.dataset
  if dataset == "synthetic":
    print(f"error: {args.config} trains on synthetic data: pass --dataset (and --data-dir) to measure a built dataset", file=sys.stderr)
    return 1
  try:
    result = mixing_stats(config, data_dir=data_dir, dataset=dataset,
                          tokenizer_path=args.tokenizer or config.data.tokenizer or None, num_batches=args.batches)
  except (FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"dataset: {result['dataset']} (train split)")
  print(f"config: {args.config}: seq_len {result['seq_len']}, global batch {result['global_batch_size']} rows, "
        f"seed {result['seed']}; first {result['batches']} batches, real tokens only")
  print("corpus token shares: " + ", ".join(f"{d} {s:.3f}" for d, s in result["corpus_token_shares"].items()))
  print(mixing.format_mixing_table(result["columns"]))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
  return 0


def stats_main(argv: list[str]) -> int:
  args = _stats_parser().parse_args(argv)
  if args.config:
    return _mixing_main(args)
  args.data_dir = args.data_dir or str(corpus_builder.default_data_dir())
  args.dataset = args.dataset or "emo_corpus"
  try:
    directory = resolve_dataset_dir(args.data_dir, args.dataset)
    tokenizer = load_tokenizer(args.tokenizer or directory)
    import tensorflow_datasets as tfds

    splits = list(tfds.builder_from_directory(str(directory)).info.splits)
  except (FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  table: dict[str, dict[str, dict[str, int]]] = {}
  for split in splits:
    source = open_data_source(args.data_dir, str(directory), split)
    table[split] = count_split(source.records, tokenizer, source.domains)
  rows = [("split", "domain", "documents", "tokens", "bytes", "bytes/token")]
  for split, per_domain in table.items():
    total = {k: sum(c[k] for c in per_domain.values()) for k in ("documents", "tokens", "bytes")}
    for domain, c in [*per_domain.items(), ("TOTAL", total)]:
      rows.append((split, domain, str(c["documents"]), str(c["tokens"]), str(c["bytes"]), f"{c['bytes'] / max(c['tokens'], 1):.2f}"))
  print(f"dataset: {directory}")
  print(format_table(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(table, indent=2))
  return 0


