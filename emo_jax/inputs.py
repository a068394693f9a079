"""Checks on model inputs that fail with a clear message instead of deep inside XLA.

Shape and dtype checks run at trace time. Value checks (token range, segment
numbering) need concrete arrays: they run when the inputs are not tracers (eager
calls, the data pipeline, the train loop before `jit`) and are skipped inside `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class InputError(ValueError):
    """A batch that the model cannot use, with a message naming the problem and the fix."""


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def check_shapes(tokens, segment_ids, positions, max_seq_len: int) -> None:
    """tokens, segment_ids, positions: integer [B, S] arrays of one shape, S <= max_seq_len."""
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}; add a batch dimension.")
    for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
        if arr is not None and tuple(arr.shape) != tuple(tokens.shape):
            raise InputError(f"{name} has shape {tuple(arr.shape)} but tokens have {tuple(tokens.shape)}; "
                             "they must match.")
    for name, arr in (("tokens", tokens), ("segment_ids", segment_ids), ("positions", positions)):
        if arr is not None and not jnp.issubdtype(arr.dtype, jnp.integer):
            raise InputError(f"{name} must be an integer array, got {arr.dtype}.")
    if tokens.shape[1] > max_seq_len:
        raise InputError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={max_seq_len}; "
                         "use shorter rows or raise max_seq_len.")


def check_token_range(tokens, vocab_size: int) -> None:
    if not _is_concrete(tokens):
        return
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = int(t.max()) if t.max() >= vocab_size else int(t.min())
        raise InputError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                         "check the tokenizer matches model.vocab_size.")


def check_segment_ids(segment_ids) -> None:
    """Per row: 0 = padding anywhere; documents numbered 1, 2, 3, ... in order (each
    step between consecutive non-padding tokens keeps the id or adds one)."""
    if not _is_concrete(segment_ids):
        return
    seg = np.asarray(segment_ids)
    if seg.size and seg.min() < 0:
        raise InputError("segment_ids must be >= 0 (0 = padding, documents numbered from 1).")
    for row_index, row in enumerate(seg):
        docs = row[row > 0]
        if docs.size == 0:
            continue
        if docs[0] != 1:
            raise InputError(f"segment_ids row {row_index} starts at {docs[0]}, not 1; number the "
                             "documents of each row 1, 2, 3, ... (0 = padding).")
        steps = np.diff(docs)
        if np.any(steps < 0):
            raise InputError(f"segment_ids row {row_index} decreases; document ids must be non-decreasing "
                             "within a row.")
        if np.any(steps > 1):
            raise InputError(f"segment_ids row {row_index} skips an id; number documents consecutively.")


def check_batch(tokens, segment_ids, positions, vocab_size: int, max_seq_len: int) -> None:
    check_shapes(tokens, segment_ids, positions, max_seq_len)
    check_token_range(tokens, vocab_size)
    check_segment_ids(segment_ids)
