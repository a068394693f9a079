"""Shared builders for the tests: small configs and synthetic, learnable packed batches."""

from __future__ import annotations

import numpy as np

from emo_jax.config import load_config

TINY = "configs/tiny.yaml"


def tiny_config(*overrides: str):
    """configs/tiny.yaml with dotted overrides."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(root, TINY), list(overrides))


def segment_positions_np(segment_ids: np.ndarray) -> np.ndarray:
    """Independent reference: position of each token inside its run of equal segment ids."""
    seg = np.asarray(segment_ids)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    return pos


def progression_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int,
                      token_range: tuple[int, int] | None = None, row_ranges=None) -> dict:
    """Rows packed with arithmetic-progression documents (a learnable stream).

    token_range: (lo, hi) for the starting tokens; row_ranges: per-row (lo, hi) override,
    to give different rows different token distributions.
    Returns numpy dict with inputs, targets, loss_mask, segment_ids, positions.
    """
    toks = np.zeros((batch, seq), np.int32)
    seg = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        lo, hi = (row_ranges[b] if row_ranges is not None else (token_range or (0, vocab)))
        t, d = 0, 1
        while t < seq:
            length = int(rng.integers(10, 60))
            start = int(rng.integers(lo, hi))
            stride = int(rng.integers(1, 5))
            n = min(length, seq - t)
            toks[b, t:t + n] = lo + (start - lo + stride * np.arange(n)) % (hi - lo)
            seg[b, t:t + n] = d
            d += 1
            t += n
    targets = np.roll(toks, -1, axis=1)
    loss_mask = (np.roll(seg, -1, axis=1) == seg).astype(np.float32)
    loss_mask[:, -1] = 0
    return dict(inputs=toks, targets=targets, loss_mask=loss_mask, segment_ids=seg,
                positions=segment_positions_np(seg).astype(np.int32))
