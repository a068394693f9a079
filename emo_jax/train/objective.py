"""The training objective of one micro-batch (docs/algorithm.md#losses).

L = CE + w_lb * mean_layers(L_LB) + w_z * mean_layers(L_Z) + w_out * Z_out, with
every mean taken over the tokens of the whole step, so that summing the
micro-batch losses gives the loss of the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from emo_jax import losses
from emo_jax.config import Config
from emo_jax.routing import RoutingStats

Array = jax.Array


class LossParts(NamedTuple):
    total: Array
    cross_entropy: Array
    load_balance: Array
    router_z: Array
    output_z: Array


def layer_routed_counts(config: Config, token_count: Array) -> int | Array:
    """n_r for the load-balance factor: an int, or f32[L, 1...] (shaped like the
    per-layer token counts) when the layers of a pruned model hold different numbers."""
    counts = config.model.routed_counts
    if len(set(counts)) == 1:
        return counts[0]
    n = jnp.asarray(counts, jnp.float32)
    return n.reshape(n.shape + (1,) * (token_count.ndim - 1))


def objective(logits: Array, stats: RoutingStats, batch: dict, config: Config, *,
              step_tokens: Array, lb_stats: RoutingStats | None = None,
              num_micro_batches: int = 1) -> LossParts:
    """Loss contribution of one micro-batch.

    logits: [B, S, V]; stats: this micro-batch's per-layer statistics ([L, ...]).
    step_tokens: loss tokens of the whole step (CE and Z_out denominators).
    lb_stats: statistics of the whole step whose counts and token totals the
      load-balance term uses ("global_batch" scope); the probability sums still come
      from `stats`, so the contributions of all micro-batches add up to the global
      loss and its gradient. None: this micro-batch is its own balance window and
      the term is averaged over micro-batches ("micro_batch"/"local" scopes).
    """
    m, w = config.model, config.loss
    ce_sum, _ = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    out_z = losses.output_z_sum(logits, batch["loss_mask"]) / step_tokens
    ce = ce_sum / step_tokens
    n_routed = layer_routed_counts(config, stats.token_count)
    if lb_stats is None:
        lb = jnp.mean(losses.load_balance_loss(stats, n_routed, m.routed_top_k)) / num_micro_batches
        z = jnp.mean(losses.router_z_loss(stats)) / num_micro_batches
    else:
        window = lb_stats._replace(prob_sums=stats.prob_sums, router_z_sum=stats.router_z_sum)
        lb = jnp.mean(losses.load_balance_loss(window, n_routed, m.routed_top_k))
        z = jnp.mean(losses.router_z_loss(window))
    total = ce + w.lb_weight * lb + w.router_z_weight * z + w.output_z_weight * out_z
    return LossParts(total, ce, lb, z, out_z)
