"""Packing documents into fixed-length rows: pure numpy, no grain, no JAX.

A document's tokens are followed by EOS; the EOS *ends* the document inside the
document's own segment (docs/algorithm.md#router-documents-in-packed-rows). Documents are concatenated and cut into rows
of `seq_len` tokens without padding (only the very last row of a finite stream is
padded). A document cut by a row boundary gives one segment per piece; its targets
stay correct across the cut because they are computed before cutting.

Row arrays (the batch contract, per row, S = seq_len):
  inputs      int32[S]   token ids (pad_id on padding)
  targets     int32[S]   next token of the same document (pad_id where there is none)
  loss_mask   float32[S] 1 where targets is a real next token, 0 on padding and on EOS
  segment_ids int32[S]   0 on padding, else 1, 2, ... per document piece, non-decreasing
  positions   int32[S]   0 at each segment start, counting up; 0 on padding
  domain_ids  int32[S]   domain index of the token's document, -1 on padding
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A token stream: the per-token arrays of concatenated documents, all of length N.
STREAM_KEYS = ("inputs", "targets", "loss_mask", "domain_ids", "doc_start")
ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "domain_ids")
Stream = dict[str, np.ndarray]
Row = dict[str, np.ndarray]


def check_token_ids(tokens: np.ndarray, vocab_size: int) -> None:
  """Raise if any id is outside [0, vocab_size)."""
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    bad = int(tokens.max() if tokens.max() >= vocab_size else tokens.min())
    raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab_size}): use the tokenizer the model was configured for")


def documents_to_stream(
  documents: Sequence[np.ndarray],  # each int32[n_i], without EOS
  domain_ids: Sequence[int],
  eos_id: int,
  pad_id: int,
) -> Stream:
  """Concatenate documents, each followed by EOS, into one token stream of N = sum(n_i + 1)."""
  if len(documents) != len(domain_ids):
    raise ValueError(f"{len(documents)} documents but {len(domain_ids)} domain ids")
  lengths = np.array([len(d) + 1 for d in documents], dtype=np.int64)  # [D], EOS included
  n = int(lengths.sum())
  ends = np.cumsum(lengths)  # [D] one past each document's EOS
  starts = ends - lengths
  inputs = np.full((n,), eos_id, dtype=np.int32)  # EOS slots stay eos_id
  for doc, start in zip(documents, starts):
    inputs[start:start + len(doc)] = doc
  targets = np.full((n,), pad_id, dtype=np.int32)
  targets[:-1] = inputs[1:]
  loss_mask = np.ones((n,), dtype=np.float32)
  if n:
    targets[ends - 1] = pad_id  # the EOS ends its document: no next token to predict
    loss_mask[ends - 1] = 0.0
  doc_start = np.zeros((n,), dtype=bool)
  doc_start[starts] = True
  return {
    "inputs": inputs,
    "targets": targets,
    "loss_mask": loss_mask,
    "domain_ids": np.repeat(np.asarray(domain_ids, dtype=np.int32), lengths),
    "doc_start": doc_start,
  }


def stream_length(stream: Stream) -> int:
  return int(stream["inputs"].shape[0])


def slice_stream(stream: Stream, start: int, stop: int) -> Stream:
  return {k: v[start:stop] for k, v in stream.items()}


def concat_streams(streams: Sequence[Stream]) -> Stream:
  return {k: np.concatenate([s[k] for s in streams]) for k in STREAM_KEYS}


def row_from_stream(piece: Stream, seq_len: int, pad_id: int) -> Row:
  """One row of `seq_len` from a stream piece of at most seq_len tokens; the rest is padding."""
  n = stream_length(piece)
  if n > seq_len:
    raise ValueError(f"stream piece of {n} tokens does not fit a row of {seq_len}")
  seg_start = piece["doc_start"].copy()  # [n]
  if n:
    seg_start[0] = True  # a piece continuing a document starts a new segment
  index = np.arange(n, dtype=np.int32)
  last_start = np.maximum.accumulate(np.where(seg_start, index, 0))  # [n]
  row = {
    "inputs": np.full((seq_len,), pad_id, dtype=np.int32),
    "targets": np.full((seq_len,), pad_id, dtype=np.int32),
    "loss_mask": np.zeros((seq_len,), dtype=np.float32),
    "segment_ids": np.zeros((seq_len,), dtype=np.int32),
    "positions": np.zeros((seq_len,), dtype=np.int32),
    "domain_ids": np.full((seq_len,), -1, dtype=np.int32),
  }
  row["inputs"][:n] = piece["inputs"]
  row["targets"][:n] = piece["targets"]
  row["loss_mask"][:n] = piece["loss_mask"]
  row["segment_ids"][:n] = np.cumsum(seg_start, dtype=np.int32)
  row["positions"][:n] = index - last_start
  row["domain_ids"][:n] = piece["domain_ids"]
  return row


def pack_stream(stream: Stream, seq_len: int, pad_id: int) -> list[Row]:
  """All rows of a finite stream; the last row is padded. Reference for the streaming packer."""
  n = stream_length(stream)
  return [row_from_stream(slice_stream(stream, s, min(s + seq_len, n)), seq_len, pad_id) for s in range(0, n, seq_len)]


def empty_stream() -> Stream:
  return {
    "inputs": np.zeros((0,), np.int32), "targets": np.zeros((0,), np.int32), "loss_mask": np.zeros((0,), np.float32),
    "domain_ids": np.zeros((0,), np.int32), "doc_start": np.zeros((0,), bool),
  }


def padding_row(seq_len: int, pad_id: int) -> Row:
  return row_from_stream(empty_stream(), seq_len, pad_id)


def stack_rows(rows: Sequence[Row]) -> dict[str, np.ndarray]:
  """Rows -> batch arrays [B, S]."""
  return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Append all-padding rows so the batch has `batch_size` rows (static shapes for jit)."""
  rows = batch["inputs"].shape[0]
  if rows >= batch_size:
    return batch
  pad = stack_rows([padding_row(batch["inputs"].shape[1], pad_id)] * (batch_size - rows))
  return {k: np.concatenate([batch[k], pad[k]]) for k in ROW_KEYS}


def segments_ending_at_eos(inputs: np.ndarray, eos_id: int) -> np.ndarray:
  """Segment ids where each EOS ends its document (attention convention): int32[..., S], from 1."""
  is_eos = (inputs == eos_id).astype(np.int32)
  return 1 + np.cumsum(is_eos, axis=-1, dtype=np.int32) - is_eos
