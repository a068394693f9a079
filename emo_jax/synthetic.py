"""Synthetic packed batches with a learnable structure, for smoke runs and benchmarks.

Every document is an arithmetic progression of token ids (start, stride drawn per
document) modulo the vocabulary, so a model can learn to predict it; documents of
random length are packed into rows with segment ids (0 = padding at row ends).
"""

from __future__ import annotations

import numpy as np


def packed_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
                 min_doc: int = 8, max_doc: int = 64, pad_fraction: float = 0.0) -> dict:
    """A batch dict (inputs, targets, loss_mask, segment_ids, positions) of int32/float32
    numpy arrays [batch, seq_len], in the format of the data pipeline."""
    inputs = np.zeros((batch, seq_len), np.int32)
    segment_ids = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    targets = np.zeros((batch, seq_len), np.int32)
    loss_mask = np.zeros((batch, seq_len), np.float32)
    for row in range(batch):
        used = seq_len - int(round(pad_fraction * seq_len))
        t, doc = 0, 1
        while t < used:
            length = min(int(rng.integers(min_doc, max_doc + 1)), used - t)
            start, stride = int(rng.integers(0, vocab_size)), int(rng.integers(1, 5))
            ids = (start + stride * np.arange(length + 1)) % vocab_size
            inputs[row, t:t + length] = ids[:-1]
            targets[row, t:t + length] = ids[1:]
            loss_mask[row, t:t + length - 1] = 1.0  # the last token of a document has no target
            segment_ids[row, t:t + length] = doc
            positions[row, t:t + length] = np.arange(length)
            t, doc = t + length, doc + 1
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions}
