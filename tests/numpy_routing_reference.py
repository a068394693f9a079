"""Slow, loop-based NumPy reference for EMO document-pooled routing.

Written from the algorithm's description only (docs/algorithm.md, "One MoE layer" to
"Losses"; not from emo_jax/routing.py); everything is
computed in float64 with explicit Python loops so that it is easy to audit.

Conventions (docs/algorithm.md#router-documents-in-packed-rows and the routing API):
  * segment ids: 0 = padding (never routed, never counted); documents are numbered
    from 1 within a row; row b's segment s is its own document even when the same
    text continues in the next row (each piece gets its own pool).
  * pool sizes: one per (row, segment slot); d >= N means "all experts".
  * ties (pool choice and top-k): the lower expert index wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return np.array([v / s for v in e], dtype=np.float64)


def logsumexp64(values):
    values = [float(v) for v in values]
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def ranked(values):
    """Indices sorted by value descending, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))


@dataclass
class ReferenceStats:
    expert_counts: np.ndarray
    prob_sums: np.ndarray
    token_count: float = 0.0
    router_z_sum: float = 0.0
    pool_size_sum: float = 0.0
    document_count: float = 0.0


@dataclass
class ReferenceRouting:
    expert_ids: list = field(default_factory=list)  # [B][S] -> list of ids (desc gate) or None on padding
    gates: np.ndarray = None  # f64[B, S, K], 0 on padding (order: descending gate)
    probs: np.ndarray = None  # f64[B, S, N] q_t, 0 on padding
    pool_mask: np.ndarray = None  # bool[B, S, N] the token's document pool (False on padding)
    doc_pools: dict = None  # (b, s) -> sorted list of pool experts
    doc_scores: dict = None  # (b, s) -> f64[N] mean_t p_t
    stats: ReferenceStats = None


def route_reference(logits, segment_ids, top_k, pool_sizes=None):
    """EMO routing of one layer, docs/algorithm.md#one-moe-layer steps 2-7 plus the loss statistics.

    logits: [B, S, N] (any float dtype; used as float64), segment_ids: int [B, S],
    pool_sizes: int [B, G] indexed by segment id, or None for the standard MoE
    (no pool, q = p).
    """
    logits = np.asarray(logits, dtype=np.float64)
    segment_ids = np.asarray(segment_ids)
    batch, seq, n = logits.shape
    out = ReferenceRouting()
    out.expert_ids = [[None] * seq for _ in range(batch)]
    out.gates = np.zeros((batch, seq, top_k))
    out.probs = np.zeros((batch, seq, n))
    out.pool_mask = np.zeros((batch, seq, n), dtype=bool)
    out.doc_pools = {}
    out.doc_scores = {}
    stats = ReferenceStats(expert_counts=np.zeros(n), prob_sums=np.zeros(n))

    for b in range(batch):
        documents = sorted({int(s) for s in segment_ids[b] if int(s) != 0})
        for s in documents:
            positions = [t for t in range(seq) if int(segment_ids[b, t]) == s]
            p = {t: softmax64(logits[b, t]) for t in positions}
            score = np.zeros(n)
            for t in positions:
                score += p[t]
            score /= len(positions)
            out.doc_scores[(b, s)] = score
            if pool_sizes is None:
                d = n
            else:
                d = min(int(pool_sizes[b][s]), n)
            pool = sorted(ranked(score)[:d])
            out.doc_pools[(b, s)] = pool
            stats.pool_size_sum += d
            stats.document_count += 1
            for t in positions:
                denom = sum(p[t][i] for i in pool)
                q = np.zeros(n)
                for i in pool:
                    q[i] = p[t][i] / denom
                chosen = ranked(q)[:top_k]
                out.expert_ids[b][t] = chosen
                out.gates[b, t] = [q[i] for i in chosen]  # NOT renormalised
                out.probs[b, t] = q
                for i in pool:
                    out.pool_mask[b, t, i] = True
                for i in chosen:
                    stats.expert_counts[i] += 1
                stats.prob_sums += q
                stats.token_count += 1
                stats.router_z_sum += logsumexp64([logits[b, t, i] for i in pool]) ** 2
    out.stats = stats
    return out


def gate_logit_gradient_reference(ref: ReferenceRouting, logits, gate_weights, prob_weights,
                                  z_weight):
    """Analytic d/dz of  sum_{t,k} w[t,k] g[t,k] + sum_i v[i] prob_sums[i] + c * router_z_sum
    for the routing `ref` with the pool and the selection held fixed (the pool choice is
    hard, step 5 of docs/algorithm.md#one-moe-layer): for an in-pool logit j of token t,
      d q_i / d z_j = q_i (delta_ij - q_j)   and   d lse_pool / d z_j = q_j,
    out-of-pool logits and padding tokens get exactly 0.

    gate_weights: [B, S, K] weights of the gates in `ref.gates` order (descending gate).
    """
    logits = np.asarray(logits, dtype=np.float64)
    batch, seq, n = logits.shape
    grad = np.zeros((batch, seq, n))
    for b in range(batch):
        for t in range(seq):
            chosen = ref.expert_ids[b][t]
            if chosen is None:
                continue
            q = ref.probs[b, t]
            pool = [i for i in range(n) if ref.pool_mask[b, t, i]]
            # u[i] = dL/dq_i (selected gates + probability sums)
            u = np.array(prob_weights, dtype=np.float64).copy()
            for k, i in enumerate(chosen):
                u[i] += gate_weights[b, t, k]
            mean_u = sum(u[i] * q[i] for i in pool)
            lse = logsumexp64([logits[b, t, i] for i in pool])
            for j in pool:
                grad[b, t, j] = q[j] * (u[j] - mean_u) + z_weight * 2.0 * lse * q[j]
    return grad


def add_shared_experts_reference(expert_ids, gates, n_routed, n_shared):
    """Appends shared experts n_routed .. n_routed + n_shared - 1 with weight exactly 1.0."""
    expert_ids = np.asarray(expert_ids)
    gates = np.asarray(gates, dtype=np.float64)
    lead = expert_ids.shape[:-1]
    new_ids = np.zeros(lead + (expert_ids.shape[-1] + n_shared,), dtype=np.int64)
    new_gates = np.zeros(lead + (gates.shape[-1] + n_shared,))
    for idx in np.ndindex(*lead):
        row_ids = list(expert_ids[idx]) + [n_routed + j for j in range(n_shared)]
        row_gates = list(gates[idx]) + [1.0] * n_shared
        new_ids[idx] = row_ids
        new_gates[idx] = row_gates
    return new_ids, new_gates


def eos_segments_reference(tokens, eos_id, valid=None):
    """Router segments split *at* EOS (docs/algorithm.md#router-documents-in-packed-rows): a
    new segment starts at each EOS token (the EOS is the first token of the new segment),
    numbered from 1 in every row; the first non-padding token of a row always opens
    segment 1. Padding -> 0."""
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    if valid is None:
        valid = np.ones((batch, seq), dtype=bool)
    out = np.zeros((batch, seq), dtype=np.int64)
    for b in range(batch):
        current = 0
        for t in range(seq):
            if not valid[b, t]:
                continue
            if current == 0:
                current = 1
            elif int(tokens[b, t]) == eos_id:
                current += 1
            out[b, t] = current
    return out


def load_balance_loss_reference(expert_counts, prob_sums, token_count, n_routed, routed_top_k):
    """L_LB = (n_r / k_r) * sum_i (c_i / T) * (prob_sums_i / T)  (docs/algorithm.md#losses)."""
    total = 0.0
    for i in range(n_routed):
        total += (float(expert_counts[i]) / token_count) * (float(prob_sums[i]) / token_count)
    return n_routed / routed_top_k * total


def router_z_loss_reference(router_z_sum, token_count):
    return float(router_z_sum) / float(token_count)


def uniform_int_reference(pool_min, pool_max):
    """The support of d ~ UniformInt[pool_min, pool_max] (both ends inclusive)."""
    return list(range(pool_min, pool_max + 1))
