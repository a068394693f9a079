"""How well batches mix the corpus's domains: pure numpy, used by `emo-jax data stats --config`.

EMO's global load-balance statistic needs batches that look like the corpus: if a batch
holds 2-3 domains, it acts like a per-domain (local) statistic. For each batch:
  domains          number of domains with at least one real token (segment_ids > 0)
  largest share    the largest domain's fraction of the batch's real tokens
  TV               total-variation distance 0.5 * sum_d |batch share_d - corpus share_d|
                   (0: the corpus mix exactly; 1: disjoint domains)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

SUMMARY_KEYS = ("batches", "domains_mean", "domains_min", "domains_max", "largest_share_mean",
                "largest_share_max", "tv_mean", "tv_max")


def domain_token_counts(batch: Mapping[str, np.ndarray], num_domains: int) -> np.ndarray:
  """int64[num_domains]: real tokens (segment_ids > 0) of each domain in a batch (any leading shape)."""
  real = np.asarray(batch["segment_ids"]) > 0
  return np.bincount(np.asarray(batch["domain_ids"])[real], minlength=num_domains).astype(np.int64)


def shares(counts: np.ndarray) -> np.ndarray:
  """Counts -> fractions along the last axis (all zeros where a row of counts is empty)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum(-1, keepdims=True)
  return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
  """0.5 * sum |p - q| over the last axis."""
  return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(-1)


def summarize(batch_counts: np.ndarray, corpus_shares: np.ndarray) -> dict[str, float]:
  """Summary (SUMMARY_KEYS) of per-batch domain token counts [N, D] against the corpus's shares [D]."""
  counts = np.asarray(batch_counts, np.int64)
  counts = counts[counts.sum(-1) > 0]  # all-padding batches say nothing about mixing
  if not counts.size:
    raise ValueError("no batch has a real token")
  p = shares(counts)
  domains = (counts > 0).sum(-1)
  largest = p.max(-1)
  tv = total_variation(p, shares(corpus_shares))
  return {
    "batches": int(counts.shape[0]),
    "domains_mean": float(domains.mean()), "domains_min": int(domains.min()), "domains_max": int(domains.max()),
    "largest_share_mean": float(largest.mean()), "largest_share_max": float(largest.max()),
    "tv_mean": float(tv.mean()), "tv_max": float(tv.max()),
  }


def batch_mixing(batches: Iterable[Mapping[str, np.ndarray]], num_domains: int, corpus_shares: np.ndarray) -> dict[str, float]:
  """summarize() over batches (dicts with 'segment_ids' and 'domain_ids')."""
  counts = [domain_token_counts(b, num_domains) for b in batches]
  return summarize(np.stack(counts) if counts else np.zeros((0, num_domains), np.int64), corpus_shares)


def iid_rows_reference(corpus_shares: np.ndarray, rows_per_batch: int, num_batches: int = 4000,
                       seed: int = 0) -> dict[str, float]:
  """The summary for ideal row mixing: every row one domain, drawn iid from the corpus's token
  shares (rows spanning two documents mix a little more, so real batches can come in lower)."""
  p = shares(corpus_shares)
  rng = np.random.default_rng(seed)
  counts = rng.multinomial(rows_per_batch, p, size=num_batches)  # [N, D] rows per domain
  return summarize(counts, p)


def format_mixing_table(columns: Mapping[str, Mapping[str, Any]]) -> str:
  """A text table: one row per statistic, one column per run (name -> summarize() dict)."""
  labels = {
    "domains_mean": "domains per batch, mean", "domains_min": "domains per batch, min",
    "domains_max": "domains per batch, max", "largest_share_mean": "largest domain share, mean",
    "largest_share_max": "largest domain share, max", "tv_mean": "TV to corpus mix, mean",
    "tv_max": "TV to corpus mix, max",
  }
  rows = [("statistic", *columns)]
  for key, label in labels.items():
    cells = []
    for summary in columns.values():
      v = summary[key]
      cells.append(str(v) if isinstance(v, int) else f"{v:.3f}")
    rows.append((label, *cells))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
