"""grain input pipeline: TFDS data source -> shuffled documents -> tokens -> packed rows -> batches.

Order of stages (per host):
  MapDataset over records, sliced to this host (`[index::count]`, documents are disjoint)
  -> shuffle(seed) -> repeat(epochs; reshuffled per epoch) -> groups of documents
  -> tokenize + EOS (one `encode_batch` per group) -> to_iter_dataset (thread prefetch)
  -> PackedRowsIterDataset (checkpointable carry-over between rows)
  -> ShuffledRowsIterDataset (training only, `shuffle_rows` > 0: rows shuffled within
     windows of that many rows, so a batch mixes documents, hence domains) -> batch
  -> optional worker processes (mp_prefetch).
The iterator's `get_state()/set_state()` resume exactly; `iterator_state_to_json` makes
the state storable as JSON (the train checkpoint stores one per process). See docs/data.md.
"""

from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import functools
import itertools
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from emo_jax.data import packing
from emo_jax.data.tokenizer import TextTokenizer, load_tokenizer

Batch = dict[str, np.ndarray]  # packing.ROW_KEYS -> [B, S]


# ------------------------------------------------------------------ data sources


def resolve_dataset_dir(data_dir: str | os.PathLike, dataset: str) -> pathlib.Path:
  """`data_dir/name[/config[/version]]` -> the newest built version directory.

  `dataset` may also be a path to a built version directory.
  """
  if (pathlib.Path(dataset) / "dataset_info.json").is_file():
    return pathlib.Path(dataset)
  base = pathlib.Path(data_dir) / dataset
  if (base / "dataset_info.json").is_file():
    return base
  if base.is_dir() and not any(base.glob("*/dataset_info.json")) and (base / "default").is_dir():
    base = base / "default"
  versions = sorted((p for p in base.glob("*") if (p / "dataset_info.json").is_file()),
                    key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
  if not versions:
    raise FileNotFoundError(f"no built dataset at {base}: run `emo-jax data build`, or point at the directory holding it (data.data_dir=DIR for train and eval, --data-dir for the data commands)")
  return versions[-1]


@dataclasses.dataclass(frozen=True)
class DataSource:
  records: Any  # random-access source: len() and __getitem__ -> {'text','domain','doc_id'} (bytes)
  domains: tuple[str, ...]
  dataset_dir: pathlib.Path


def open_data_source(data_dir: str | os.PathLike, dataset: str, split: str) -> DataSource:
  """The array_record data source of one split, and the dataset's domain list."""
  import tensorflow_datasets as tfds  # imported here: tfds import is slow and only needed to open

  directory = resolve_dataset_dir(data_dir, dataset)
  builder = tfds.builder_from_directory(str(directory))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not in {directory} (have {', '.join(builder.info.splits)})")
  domains = tuple(builder.info.metadata.get("domains", ()) if builder.info.metadata else ())
  if not domains:
    raise ValueError(f"{directory} has no 'domains' metadata: rebuild it with emo_jax.data.corpus_builder")
  return DataSource(builder.as_data_source(split=split), domains, directory)


# ------------------------------------------------------------------ tokenizing


@dataclasses.dataclass(frozen=True)
class TokenizeDocuments:
  """Records of a group of documents -> one token stream (packing.documents_to_stream)."""

  tokenizer: TextTokenizer
  domains: tuple[str, ...]
  check_vocab: bool = True

  def __call__(self, records: Sequence[dict[str, Any]]) -> packing.Stream:
    index = {d: i for i, d in enumerate(self.domains)}
    texts, domain_ids = [], []
    for rec in records:
      text = rec["text"]
      text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
      domain = rec["domain"].decode() if isinstance(rec["domain"], bytes) else rec["domain"]
      if domain not in index:
        raise ValueError(f"document domain {domain!r} is not in the dataset's domains {self.domains}: rebuild the dataset")
      if text:
        texts.append(text)
        domain_ids.append(index[domain])
    tokens = self.tokenizer.encode_batch(texts)
    keep = [i for i, t in enumerate(tokens) if t.size]  # an empty document adds nothing, not a lone EOS
    tokens, domain_ids = [tokens[i] for i in keep], [domain_ids[i] for i in keep]
    if self.check_vocab:
      for t in tokens:
        packing.check_token_ids(t, self.tokenizer.vocab_size)
    return packing.documents_to_stream(tokens, domain_ids, self.tokenizer.eos_id, self.tokenizer.pad_id)


# ------------------------------------------------------------------ packing stage


class _PackedRowsIterator(grain.DatasetIterator):
  """Cuts a stream of token streams into rows; state = (parent state before the oldest
  unfinished stream, tokens of it already emitted), so resuming re-reads that stream."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    # Pending streams: [parent state before reading it, stream, tokens already emitted].
    self._pending: collections.deque[list[Any]] = collections.deque()
    self._buffered = 0  # tokens not yet emitted
    self._exhausted = False

  def _read(self) -> bool:
    state = self._parent.get_state()
    try:
      stream = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return False
    if packing.stream_length(stream):
      self._pending.append([state, stream, 0])
      self._buffered += packing.stream_length(stream)
    return True

  def __next__(self) -> packing.Row:
    while self._buffered < self._seq_len and not self._exhausted:
      self._read()
    if self._buffered == 0:
      raise StopIteration
    pieces, need = [], self._seq_len
    while need and self._pending:
      entry = self._pending[0]
      _, stream, done = entry
      take = min(need, packing.stream_length(stream) - done)
      pieces.append(packing.slice_stream(stream, done, done + take))
      entry[2] += take
      need -= take
      self._buffered -= take
      if entry[2] == packing.stream_length(stream):
        self._pending.popleft()
    return packing.row_from_stream(packing.concat_streams(pieces), self._seq_len, self._pad_id)

  def get_state(self) -> dict[str, Any]:
    if self._pending:
      return {"parent": self._pending[0][0], "skip_tokens": self._pending[0][2]}
    return {"parent": self._parent.get_state(), "skip_tokens": 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending.clear()
    self._buffered = 0
    self._exhausted = False
    if state["skip_tokens"]:
      if not self._read() or not self._pending:
        raise ValueError("iterator state does not match the dataset (stream to resume is missing)")
      self._pending[0][2] = state["skip_tokens"]
      self._buffered -= state["skip_tokens"]


class PackedRowsIterDataset(grain.IterDataset):
  """Token streams -> packed rows of `seq_len` (see packing.py for the row format)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> _PackedRowsIterator:
    return _PackedRowsIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

  def __str__(self) -> str:
    return f"PackedRowsIterDataset(seq_len={self._seq_len})"


# ------------------------------------------------------------------ row shuffle stage

_ROW_SHUFFLE_SALT = 0x5EED_0F_0705  # separates this stage's random stream from other uses of the seed


def window_permutation(seed: int, window_index: int, size: int) -> np.ndarray:
  """The order in which a window of `size` rows is emitted: a pure function of its arguments.

  Sorting PCG64's raw 64-bit outputs gives a uniformly random permutation (ties have
  probability ~size^2/2^64) and only depends on the bit generator's output stream,
  which NumPy keeps stable across versions (NEP 19), unlike `Generator.permutation`.
  """
  entropy = [_ROW_SHUFFLE_SALT, seed % 2**64, window_index]
  keys = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(size)
  return np.argsort(keys, kind="stable")


class _ShuffledRowsIterator(grain.DatasetIterator):
  """Reads `window` rows, emits them in the order window_permutation(seed, window index).

  State = {"parent": parent state at the start of the current window, "window_index",
  "emitted": rows of the window already emitted}: small JSON, no row contents.
  set_state re-reads the window from the parent (re-tokenizing up to `window` rows) and
  skips the emitted rows, so a resumed iterator yields exactly the same rows.
  """

  def __init__(self, parent: grain.DatasetIterator, window: int, seed: int):
    super().__init__(parent)
    self._window = window
    self._seed = seed
    self._window_index = 0
    self._start = copy.deepcopy(self._parent.get_state())  # parent state before the window
    self._rows: list[packing.Row | None] | None = None  # the window in emission order; None: not read yet
    self._emitted = 0
    self._exhausted = False  # the parent raised StopIteration

  def _fill(self) -> None:
    rows = []
    while len(rows) < self._window and not self._exhausted:
      try:
        rows.append(next(self._parent))
      except StopIteration:
        self._exhausted = True
    self._rows = [rows[i] for i in window_permutation(self._seed, self._window_index, len(rows))]
    if self._emitted > len(self._rows):
      raise ValueError(f"iterator state does not match the dataset (window {self._window_index} has "
                       f"{len(self._rows)} rows, the state has {self._emitted} emitted)")

  def __next__(self) -> packing.Row:
    if self._rows is None:
      if self._exhausted:
        raise StopIteration
      self._fill()
    if self._emitted == len(self._rows):  # only an empty final window (rows run out at a window end)
      raise StopIteration
    row, self._rows[self._emitted] = self._rows[self._emitted], None  # free it
    self._emitted += 1
    if self._emitted == len(self._rows):  # window done: the next one starts at the parent's position
      self._start = copy.deepcopy(self._parent.get_state())
      self._window_index += 1
      self._rows, self._emitted = None, 0
    return row

  def get_state(self) -> dict[str, Any]:
    return {"parent": copy.deepcopy(self._start), "window_index": self._window_index, "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._start = copy.deepcopy(state["parent"])
    self._window_index = int(state["window_index"])
    self._emitted = int(state["emitted"])
    self._rows = None  # re-read lazily at the next row
    self._exhausted = False


class ShuffledRowsIterDataset(grain.IterDataset):
  """Shuffles rows within consecutive windows of `window` rows (the last one may be shorter).

  Exact and checkpointable (see _ShuffledRowsIterator); every row is emitted once. Written
  here rather than using grain's WindowShuffleIterDataset, whose checkpointing was fixed
  only in grain 0.2.16 (this package allows grain>=0.2.12) and whose state is grain's.
  """

  def __init__(self, parent: grain.IterDataset, window: int, seed: int):
    super().__init__(parent)
    if window < 1:
      raise ValueError(f"the row shuffle window must be positive, got {window}")
    self._window = window
    self._seed = seed

  def __iter__(self) -> _ShuffledRowsIterator:
    return _ShuffledRowsIterator(self._parent.__iter__(), self._window, self._seed)

  def __str__(self) -> str:
    return f"ShuffledRowsIterDataset(window={self._window}, seed={self._seed})"


# ------------------------------------------------------------------ the pipeline


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  seq_len: int
  batch_size: int  # rows per host
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None: repeat forever
  shard_index: int = 0
  shard_count: int = 1
  docs_per_group: int = 64  # documents tokenized together (one encode_batch call)
  drop_remainder: bool = True  # False: the last, partial batch is padded with padding rows
  num_threads: int = 2  # tokenizing threads (grain ReadOptions)
  prefetch_buffer_size: int = 8  # groups read ahead per thread pool
  num_workers: int = 0  # > 0: worker processes after batching (mp_prefetch)
  shuffle_rows: int = 0  # > 0: shuffle packed rows within windows of this many rows; 0: off


def _mark_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; unparsed flags raise UnparsedFlagAccessError.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def build_dataset(records: Any, domains: Sequence[str], tokenizer: TextTokenizer, cfg: PipelineConfig) -> grain.IterDataset:
  """The grain dataset of batches (dict of [batch_size, seq_len] numpy arrays)."""
  if not 0 <= cfg.shard_index < cfg.shard_count:
    raise ValueError(f"shard_index {cfg.shard_index} is not in [0, {cfg.shard_count})")
  if cfg.shuffle_rows < 0:
    raise ValueError(f"shuffle_rows must be >= 0 (0 = no row shuffle), got {cfg.shuffle_rows}")
  if len(records) < cfg.shard_count:
    raise ValueError(f"{len(records)} documents cannot be split across {cfg.shard_count} hosts: use a bigger dataset")
  ds = grain.MapDataset.source(records)[cfg.shard_index::cfg.shard_count]
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs)
  ds = ds.batch(cfg.docs_per_group, batch_fn=list)  # list: numpy would strip trailing NUL bytes
  ds = ds.map(TokenizeDocuments(tokenizer, tuple(domains)))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))
  it = PackedRowsIterDataset(it, cfg.seq_len, tokenizer.pad_id)
  if cfg.shuffle_rows:
    it = ShuffledRowsIterDataset(it, cfg.shuffle_rows, cfg.seed)
  it = it.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=packing.stack_rows)
  if not cfg.drop_remainder:
    it = it.map(functools.partial(packing.pad_batch, batch_size=cfg.batch_size, pad_id=tokenizer.pad_id))
  if cfg.num_workers > 0:
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=2))
  return it


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def _per_host_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} hosts")
  return global_batch_size // process_count


def make_train_iterator(
  data_dir: str | os.PathLike,
  dataset: str = "emo_corpus",
  *,
  seq_len: int,
  global_batch_size: int,
  seed: int = 0,
  split: str = "train",
  tokenizer_path: str | os.PathLike | None = None,
  eos_id: int | None = None,
  pad_id: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  num_workers: int = 0,
  num_threads: int = 2,
  docs_per_group: int = 64,
  shuffle_rows: int = 0,
) -> grain.DatasetIterator:
  """Endless, shuffled, checkpointable iterator of this host's batches ([global/hosts, seq_len]).

  Host index/count default to jax.process_index()/process_count(); the tokenizer defaults
  to the tokenizer.json stored with the dataset. `shuffle_rows` > 0 shuffles packed rows
  within windows of that many rows (ShuffledRowsIterDataset); 0 keeps packing order.
  """
  source = open_data_source(data_dir, dataset, split)
  tokenizer = load_tokenizer(tokenizer_path or source.dataset_dir, eos_id=eos_id, pad_id=pad_id)
  index, count = _host(process_index, process_count)
  cfg = PipelineConfig(
    seq_len=seq_len, batch_size=_per_host_batch(global_batch_size, count), seed=seed, shuffle=True,
    num_epochs=None, shard_index=index, shard_count=count, docs_per_group=docs_per_group,
    drop_remainder=True, num_threads=num_threads, num_workers=num_workers, shuffle_rows=shuffle_rows)
  return iter(build_dataset(source.records, source.domains, tokenizer, cfg))


def make_eval_iterator(
  data_dir: str | os.PathLike,
  dataset: str = "emo_corpus",
  *,
  seq_len: int,
  global_batch_size: int,
  split: str = "validation",
  num_batches: int | None = None,
  tokenizer_path: str | os.PathLike | None = None,
  eos_id: int | None = None,
  pad_id: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int = 2,
) -> Iterator[Batch]:
  """One unshuffled pass over `split`; the last batch is padded (loss_mask 0).

  With `num_batches`, exactly that many batches (stopping early, or padding with
  all-padding batches), so every host runs the same number of eval steps.
  """
  source = open_data_source(data_dir, dataset, split)
  tokenizer = load_tokenizer(tokenizer_path or source.dataset_dir, eos_id=eos_id, pad_id=pad_id)
  index, count = _host(process_index, process_count)
  batch_size = _per_host_batch(global_batch_size, count)
  cfg = PipelineConfig(
    seq_len=seq_len, batch_size=batch_size, shuffle=False, num_epochs=1, shard_index=index,
    shard_count=count, drop_remainder=False, num_threads=num_threads)
  batches: Iterator[Batch] = iter(build_dataset(source.records, source.domains, tokenizer, cfg))
  if num_batches is None:
    return batches
  padding = packing.stack_rows([packing.padding_row(seq_len, tokenizer.pad_id)] * batch_size)
  return itertools.islice(itertools.chain(batches, itertools.repeat(padding)), num_batches)


# ------------------------------------------------------------------ iterator state


def _to_json(value: Any) -> Any:
  if isinstance(value, dict):
    if not all(isinstance(k, str) for k in value):
      return {"__items__": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    return {k: _to_json(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return {"__tuple__": [_to_json(v) for v in value]}
  if isinstance(value, list):
    return [_to_json(v) for v in value]
  if isinstance(value, bytes):
    return {"__bytes__": base64.b64encode(value).decode("ascii")}
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"cannot store iterator state value of type {type(value).__name__}")


def _from_json(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {"__tuple__"}:
      return tuple(_from_json(v) for v in value["__tuple__"])
    if set(value) == {"__bytes__"}:
      return base64.b64decode(value["__bytes__"])
    if set(value) == {"__items__"}:
      return {_from_json(k): _from_json(v) for k, v in value["__items__"]}
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


def iterator_state_to_json(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as a JSON-able dict (one per process: each host has its own)."""
  return {"grain_state": _to_json(iterator.get_state())}


def restore_iterator_state(iterator: grain.DatasetIterator, state: dict[str, Any]) -> None:
  """Move a freshly made iterator (same arguments) to a position from `iterator_state_to_json`."""
  if "grain_state" not in state:
    raise ValueError("not an iterator state: expected the dict made by iterator_state_to_json")
  iterator.set_state(_from_json(state["grain_state"]))


def save_iterator_state(path: str | os.PathLike, iterator: grain.DatasetIterator) -> None:
  pathlib.Path(path).write_text(json.dumps(iterator_state_to_json(iterator)))


def load_iterator_state(path: str | os.PathLike, iterator: grain.DatasetIterator) -> None:
  restore_iterator_state(iterator, json.loads(pathlib.Path(path).read_text()))
