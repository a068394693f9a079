"""Document-pooled routing (EMO) as pure functions of arrays: docs/algorithm.md#one-moe-layer.

No Flax, no mesh, no globals: any JAX codebase can call these. Shape letters:
B batch rows, S sequence, N routed experts (n_r), K routed experts per token (k_r),
G segment slots per row (segment id 0 = padding, so G = max segments + 1).

The pipeline for one layer:
  probs = router_probs(logits)                        # p_t, softmax in float32
  scores = document_scores(probs, segment_ids, G)     # S_s = mean_{t in s} p_t
  sizes = draw_pool_sizes(key, (B, G), d_min, d_max)  # d_s, per (document, layer)
  pools = document_pool(scores, sizes)                # D_s = top-d_s(S_s), no gradient
  q = pooled_probs(logits, token_pool)                # renormalised inside the pool
  gates, ids = top-k_r(q)                             # gates are NOT renormalised
`route()` composes them and also returns the load-balance statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


class RoutingStats(NamedTuple):
    """Per-layer sums that the global load-balance and z-losses need.

    Every field is a plain sum over non-padding tokens, so summing the statistics of
    several devices or micro-batches gives the statistics of their union.
    """

    expert_counts: Array  # f32[N]  c_i: routed assignments per expert (no gradient)
    prob_sums: Array  # f32[N]  sum_t q_t(i) (differentiable)
    token_count: Array  # f32[]  non-padding tokens
    router_z_sum: Array  # f32[]  sum_t logsumexp_{i in pool}(z_t(i))^2 (differentiable)
    pool_size_sum: Array  # f32[]  sum over documents of the effective pool size
    document_count: Array  # f32[]  documents (segments holding at least one token)


class Routing(NamedTuple):
    expert_ids: Array  # i32[B, S, K]  routed expert index in [0, N)
    gates: Array  # f32[B, S, K]  q_t(i) of the chosen experts; 0 on padding
    probs: Array  # f32[B, S, N]  q_t: renormalised in-pool probabilities; 0 on padding
    stats: RoutingStats


def router_probs(logits: Array) -> Array:
    """p_t = softmax(z_t) over routed experts, in float32. f32[..., N] -> f32[..., N]."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def segments_starting_at_eos(tokens: Array, eos_id: int, valid: Array | None = None) -> Array:
    """Router segments as the official EMO code derives them: a new segment starts *at*
    every EOS (segment = cumsum(is_eos)), renumbered to start at 1 in every row.

    tokens: i32[B, S]; valid: bool[B, S] (False = padding -> segment 0). Returns i32[B, S].
    """
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    # The first real token of a row opens segment 1 whatever it is; every later EOS
    # among the real tokens opens the next one. Padding (anywhere) is segment 0.
    first_real = valid & (jnp.cumsum(valid.astype(jnp.int32), axis=1) == 1)
    opens = (tokens == eos_id) & valid & ~first_real
    segment_ids = jnp.cumsum(opens.astype(jnp.int32), axis=1) + 1
    segment_ids = jnp.where(valid, segment_ids, 0)
    return segment_ids


def _segment_slots(segment_ids: Array, num_segments: int) -> Array:
    """Flat slot b * G + s for every token. i32[B, S] -> i32[B, S]."""
    row = jnp.arange(segment_ids.shape[0], dtype=jnp.int32)[:, None]
    return row * num_segments + segment_ids


def document_scores(probs: Array, segment_ids: Array, num_segments: int) -> Array:
    """S_s = mean of p_t over the tokens of each segment (softmax first, then average).

    probs: f32[B, S, N]; segment_ids: i32[B, S] in [0, G). Returns f32[B, G, N]; empty
    segments score 0. Row b's segment s is slot (b, s): documents never span rows.
    """
    batch, _, n_routed = probs.shape
    slots = _segment_slots(segment_ids, num_segments).reshape(-1)
    flat_probs = probs.reshape(-1, n_routed)
    sums = jax.ops.segment_sum(flat_probs, slots, num_segments=batch * num_segments)
    counts = jax.ops.segment_sum(jnp.ones_like(slots, jnp.float32), slots,
                                 num_segments=batch * num_segments)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return means.reshape(batch, num_segments, n_routed)


def draw_pool_sizes(key: Array, shape: tuple[int, ...], pool_min: int, pool_max: int) -> Array:
    """d ~ UniformInt[pool_min, pool_max] (both inclusive), one per entry of `shape`."""
    return jax.random.randint(key, shape, pool_min, pool_max + 1, dtype=jnp.int32)


def document_pool(scores: Array, pool_sizes: Array) -> Array:
    """D_s = the top-d_s experts of S_s. A hard choice: no gradient flows through it.

    scores: f32[B, G, N]; pool_sizes: i32[B, G] (>= N means all experts).
    Returns bool[B, G, N]. Ties go to the lower expert index.
    """
    # Each expert's rank in a stable descending sort, counted directly: the experts
    # scoring higher, plus those scoring the same with a lower index. The pool is
    # rank < d, exactly the top-d of a stable descending argsort, ties included. An
    # [N, N] comparison per slot that XLA fuses into the reduction, and no sort: on CPU
    # at S2 (B 8, G 513, N 63) routing with pools costs 8.1 ms per layer forward+backward
    # against 16.7 ms with one sort of every slot (benchmarks/bench_routing.py).
    scores = jax.lax.stop_gradient(scores)
    n_routed = scores.shape[-1]
    size = jnp.clip(pool_sizes, 0, n_routed)[..., None]  # i32[B, G, 1]
    other, mine = scores[..., None, :], scores[..., :, None]  # [B, G, 1, N], [B, G, N, 1]
    index = jnp.arange(n_routed)
    lower_index = index[None, :] < index[:, None]  # [N, N]: other's index below mine
    beats = (other > mine) | ((other == mine) & lower_index)
    rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)  # i32[B, G, N]
    return rank < size


def token_pool_mask(pool: Array, segment_ids: Array) -> Array:
    """Each token's document pool. bool[B, G, N], i32[B, S] -> bool[B, S, N]."""
    return jnp.take_along_axis(pool, segment_ids[..., None], axis=1)


def pooled_probs(logits: Array, pool_mask: Array | None) -> Array:
    """q_t: softmax over in-pool logits only (= p renormalised over the pool).

    Out-of-pool logits are replaced by -inf with `where`, so they get exactly zero
    gradient. pool_mask None means no pool (standard MoE: q = p). f32[..., N].
    """
    logits = logits.astype(jnp.float32)
    if pool_mask is None:
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.softmax(jnp.where(pool_mask, logits, -jnp.inf), axis=-1)


def pooled_logsumexp(logits: Array, pool_mask: Array | None) -> Array:
    """logsumexp over in-pool logits (all of them without a pool). f32[..., N] -> f32[...]."""
    logits = logits.astype(jnp.float32)
    if pool_mask is not None:
        logits = jnp.where(pool_mask, logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1)


def routing_stats(
    expert_ids: Array, probs: Array, router_lse: Array, valid: Array,
    pool_sizes: Array | None, segment_ids: Array, num_segments: int,
) -> RoutingStats:
    """Sums for the losses and the logs; padding tokens count nowhere.

    expert_ids: i32[B, S, K]; probs: f32[B, S, N]; router_lse: f32[B, S];
    valid: bool[B, S]; pool_sizes: i32[B, G] or None.
    """
    n_routed = probs.shape[-1]
    weight = valid.astype(jnp.float32)
    counts = jnp.zeros((n_routed,), jnp.float32).at[expert_ids.reshape(-1)].add(
        jnp.broadcast_to(weight[..., None], expert_ids.shape).reshape(-1))
    tokens_per_slot = jax.ops.segment_sum(
        weight.reshape(-1), _segment_slots(segment_ids, num_segments).reshape(-1),
        num_segments=segment_ids.shape[0] * num_segments).reshape(segment_ids.shape[0], num_segments)
    is_document = (tokens_per_slot > 0).at[:, 0].set(False)  # slot 0 is padding
    if pool_sizes is None:
        effective = jnp.full(is_document.shape, n_routed, jnp.float32)
    else:
        effective = jnp.minimum(pool_sizes, n_routed).astype(jnp.float32)
    return RoutingStats(
        expert_counts=jax.lax.stop_gradient(counts),
        prob_sums=jnp.sum(probs * weight[..., None], axis=(0, 1)),
        token_count=jnp.sum(weight),
        router_z_sum=jnp.sum(jnp.where(valid, jnp.square(router_lse), 0.0)),
        pool_size_sum=jnp.sum(jnp.where(is_document, effective, 0.0)),
        document_count=jnp.sum(is_document.astype(jnp.float32)),
    )


def route(
    logits: Array,
    segment_ids: Array,
    top_k: int,
    pool_sizes: Array | None = None,
    num_segments: int | None = None,
) -> Routing:
    """EMO routing for one layer: pool per document, then top-k_r inside the pool.

    logits: f32[B, S, N] router logits of the routed experts.
    segment_ids: i32[B, S], 0 = padding (never routed, never counted), documents
      numbered from 1 within each row.
    top_k: K = k_r, routed experts per token.
    pool_sizes: i32[B, G], d_s for every segment slot (entries >= N mean no
      restriction; entries below K are raised to K, since a token takes K experts
      from inside its pool); None = standard MoE (no pool, q = p).
    num_segments: G, static; defaults to pool_sizes.shape[1], else S + 1.
    """
    # The public boundary: shapes and dtypes checked at trace time (chex, no runtime cost).
    chex.assert_rank(logits, 3)
    chex.assert_type(logits, float)
    chex.assert_shape(segment_ids, logits.shape[:2])
    chex.assert_type(segment_ids, int)
    if pool_sizes is not None:
        chex.assert_shape(pool_sizes, (logits.shape[0], None))
        chex.assert_type(pool_sizes, int)
    batch, seq, n_routed = logits.shape
    if not 0 < top_k <= n_routed:
        raise ValueError(f"top_k={top_k} must be in [1, {n_routed}] (the routed experts of these logits).")
    if pool_sizes is not None:
        pool_sizes = jnp.maximum(pool_sizes, top_k)
        num_segments = pool_sizes.shape[1]
    elif num_segments is None:
        num_segments = seq + 1
    valid = segment_ids > 0
    if pool_sizes is None:
        pool_mask = None
    else:
        scores = document_scores(router_probs(logits), segment_ids, num_segments)
        pool_mask = token_pool_mask(document_pool(scores, pool_sizes), segment_ids)
    q = pooled_probs(logits, pool_mask)
    q = jnp.where(valid[..., None], q, 0.0)
    gates, expert_ids = jax.lax.top_k(q, top_k)
    stats = routing_stats(expert_ids, q, pooled_logsumexp(logits, pool_mask), valid,
                          pool_sizes, segment_ids, num_segments)
    return Routing(expert_ids=expert_ids.astype(jnp.int32), gates=gates, probs=q, stats=stats)


def pool_sizes_for_mode(
    mode: str, key: Array | None, batch: int, num_segments: int,
    pool_size: int, pool_min: int, pool_max: int,
) -> Array | None:
    """Pool sizes i32[B, G] for a routing mode: "none" -> None (standard MoE),
    "fixed" -> pool_size everywhere, "random" -> UniformInt[pool_min, pool_max]."""
    if mode == "none":
        return None
    if mode == "fixed":
        return jnp.full((batch, num_segments), pool_size, jnp.int32)
    if mode == "random":
        if key is None:
            raise ValueError("random pool sizes need an RNG key; pass rngs={'routing': key}.")
        return draw_pool_sizes(key, (batch, num_segments), pool_min, pool_max)
    raise ValueError(f"unknown pool mode {mode!r}; use 'none', 'fixed' or 'random'.")


def add_shared_experts(expert_ids: Array, gates: Array, n_routed: int, n_shared: int,
                       shared_gates: Array | None = None) -> tuple[Array, Array]:
    """Appends the shared experts (ids n_routed..E-1) to every token.

    expert_ids: i32[..., K]; gates: f32[..., K] -> i32[..., K + n_s], f32[..., K + n_s].
    shared_gates: f32[..., n_s], the shared experts' weights (with n_s >= 2, the softmax of
    the shared router's logits, as the official EMO model); None gives each gate exactly 1.0
    (the only weight a single shared expert can have: a softmax over one logit is 1).
    """
    if n_shared == 0:
        return expert_ids, gates
    lead = expert_ids.shape[:-1]
    shared_ids = jnp.broadcast_to(jnp.arange(n_routed, n_routed + n_shared, dtype=jnp.int32),
                                  lead + (n_shared,))
    if shared_gates is None:
        shared_gates = jnp.ones(lead + (n_shared,), gates.dtype)
    else:
        chex.assert_shape(shared_gates, lead + (n_shared,))
        shared_gates = shared_gates.astype(gates.dtype)
    return (jnp.concatenate([expert_ids, shared_ids], axis=-1),
            jnp.concatenate([gates, shared_gates], axis=-1))
