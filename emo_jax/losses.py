"""Training losses (docs/algorithm.md#losses) as pure functions of arrays.

Total: L = CE + w_lb * mean_layers(L_LB) + w_z * mean_layers(L_Z) + w_out * Z_out.
The load-balance and router z-losses take *summed* routing statistics
(`routing.RoutingStats`), so statistics summed over devices or micro-batches give
exactly the loss of the union of their tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emo_jax.routing import RoutingStats

Array = jax.Array


def cross_entropy(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Summed masked token cross entropy and the number of counted tokens.

    logits: [B, S, V] (any float dtype; computed in float32); targets: i32[B, S];
    loss_mask: [B, S] (1 = count). Returns (sum f32[], count f32[]).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((lse - target_logit) * mask), jnp.sum(mask)


def output_z_sum(logits: Array, loss_mask: Array) -> Array:
    """sum_t logsumexp(logits_t)^2 over counted tokens (divide by the count for Z_out)."""
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.square(lse) * loss_mask.astype(jnp.float32))


def load_balance_loss(stats: RoutingStats, n_routed: int, routed_top_k: int) -> Array:
    """L_LB = (n_r / k_r) * sum_i f_i * P_i, f_i = c_i / T (no gradient), P_i = mean_t q_t(i).

    Works on one layer's stats (fields [N] and []) or stacked layers ([L, N] and [L]),
    returning f32[] or f32[L]. Equals 1.0 at perfect balance.
    """
    tokens = jnp.maximum(stats.token_count, 1.0)[..., None]
    frequency = jax.lax.stop_gradient(stats.expert_counts) / tokens
    mean_prob = stats.prob_sums / tokens
    return (n_routed / routed_top_k) * jnp.sum(frequency * mean_prob, axis=-1)


def router_z_loss(stats: RoutingStats) -> Array:
    """L_Z = mean_t (logsumexp over in-pool routed logits)^2. f32[] or f32[L]."""
    return stats.router_z_sum / jnp.maximum(stats.token_count, 1.0)


def sum_stats(stats: RoutingStats, axis: int = 0) -> RoutingStats:
    """Sums stacked statistics (e.g. over micro-batches) along `axis`."""
    return jax.tree.map(lambda s: jnp.sum(s, axis=axis), stats)


