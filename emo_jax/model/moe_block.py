"""The EMO MoE block: a Linen shell that owns the parameters and calls `moe_layer`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from emo_jax import routing
from emo_jax.config import ModelConfig, RoutingConfig
from emo_jax.model.layers import dense_init, param_with_axes
from emo_jax.moe import MoELayerFn, moe_layer, router_logits

Array = jax.Array


def pool_sizes_for(cfg: RoutingConfig, train: bool, key, batch: int, num_segments: int):
    """Pool sizes i32[B, G] for training (cfg.pool) or evaluation (cfg.eval_pool)."""
    if train:
        return routing.pool_sizes_for_mode(cfg.pool, key, batch, num_segments,
                                           cfg.pool_size, cfg.pool_min, cfg.pool_max)
    return routing.pool_sizes_for_mode(cfg.eval_pool, None, batch, num_segments,
                                       cfg.eval_pool_size, cfg.eval_pool_size, cfg.eval_pool_size)


class MoEBlock(nn.Module):
    """EMO MoE feed-forward. Experts n_r..E-1 are the shared ones: weight 1 for one shared
    expert; with n_s >= 2 a softmax over their own router `shared_router` f32[D, n_s]
    (as the official EMO model; the parameter exists only when n_s >= 2, so models with
    0 or 1 shared experts keep their parameter tree).

    Pool sizes come from the 'routing' RNG stream; Flax folds the module path into
    it, so every layer draws its own sizes from the step's key. `n_experts` is this
    layer's expert count (a pruned layer holds fewer; None = config.n_experts). With
    mutable=['intermediates'] the block also sows its router logits f32[B, S, N]
    (expert selection and specialisation analysis read them).
    """

    config: ModelConfig
    routing_config: RoutingConfig
    moe_fn: MoELayerFn = moe_layer
    n_experts: int | None = None

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, train: bool) -> tuple[Array, routing.RoutingStats]:
        """x: [B, S, D]; segment_ids: i32[B, S] -> (y [B, S, D], this layer's stats)."""
        cfg = self.config
        pdtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        init = dense_init(cfg.init_std)
        e = cfg.n_experts if self.n_experts is None else self.n_experts
        n_r, h, d = e - cfg.n_shared_experts, cfg.expert_hidden, cfg.d_model
        # The router stays float32 (docs/algorithm.md#one-moe-layer), whatever the compute dtype.
        w_router = param_with_axes(self, "router", init, (d, n_r), jnp.float32, ("embed", "router_exp"))
        w_gate = param_with_axes(self, "w_gate", init, (e, d, h), pdtype, ("exp", "embed", "mlp"))
        w_up = param_with_axes(self, "w_up", init, (e, d, h), pdtype, ("exp", "embed", "mlp"))
        w_down = param_with_axes(self, "w_down", init, (e, h, d), pdtype, ("exp", "mlp", "embed"))
        w_shared_router = None
        if cfg.n_shared_experts >= 2:
            w_shared_router = param_with_axes(self, "shared_router", init, (d, cfg.n_shared_experts), jnp.float32,
                                              ("embed", "router_exp"))

        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "router_logits", router_logits(x.astype(dtype), w_router))
        batch, seq = segment_ids.shape
        key = self.make_rng("routing") if (train and self.routing_config.pool == "random") else None
        pool_sizes = pool_sizes_for(self.routing_config, train, key, batch, seq + 1)
        # Passed only when it exists, so MoE functions written for 0-1 shared experts still fit.
        extra = {} if w_shared_router is None else {"w_shared_router": w_shared_router}
        return self.moe_fn(x.astype(dtype), segment_ids, pool_sizes, w_router,
                           w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype),
                           routed_top_k=cfg.routed_top_k, n_shared=cfg.n_shared_experts, **extra)
