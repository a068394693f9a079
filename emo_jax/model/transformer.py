"""The EMO / OLMoE decoder-only language model (Linen)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from emo_jax import inputs, routing
from emo_jax.config import Config, ModelConfig, RoutingConfig
from emo_jax.kernels.attention import AttentionFn, attention_for, reference_attention
from emo_jax.model.attention import Attention
from emo_jax.model.layers import RMSNorm, dense_init, param_with_axes, project, segment_positions
from emo_jax.model.moe_block import MoEBlock
from emo_jax.moe import MoELayerFn, make_moe_layer, moe_layer

Array = jax.Array


class Block(nn.Module):
    """One decoder layer. "pre": x + f(norm(x)) (EMO); "post": x + norm(f(x)) (OLMo 2)."""

    config: ModelConfig
    routing_config: RoutingConfig
    moe_fn: MoELayerFn = moe_layer
    n_experts: int | None = None  # this layer's experts (pruned models); None = config.n_experts
    attention_fn: AttentionFn = reference_attention

    @nn.compact
    def __call__(self, x, segment_ids, router_segments, positions, train: bool):
        """x: [B, S, D]; segment_ids (attention), router_segments, positions: i32[B, S]."""
        cfg = self.config
        pdtype = jnp.dtype(cfg.param_dtype)
        attn_norm = RMSNorm(cfg.norm_eps, ("norm",), pdtype, name="attention_norm")
        ffn_norm = RMSNorm(cfg.norm_eps, ("norm",), pdtype, name="feedforward_norm")
        attention = Attention(cfg, self.attention_fn, name="attention")
        moe = MoEBlock(cfg, self.routing_config, self.moe_fn, self.n_experts, name="moe")
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cfg.norm_placement == "pre":
            x = x + attention(attn_norm(x), segment_ids, positions)
            y, stats = moe(ffn_norm(x), router_segments, train)
            x = x + y
        else:
            x = x + attn_norm(attention(x, segment_ids, positions))
            y, stats = moe(x, router_segments, train)
            x = x + ffn_norm(y)
        return x, stats


class EmoTransformer(nn.Module):
    """tokens -> logits, plus the routing statistics of every layer (stacked [L, ...]).

    Call with rngs={'routing': key} when train=True and the pool size is random.
    """

    config: ModelConfig
    routing_config: RoutingConfig
    moe_fn: MoELayerFn = moe_layer
    attention_fn: AttentionFn = reference_attention  # build_model: the kernel of config.kernels.attention

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None,
                 positions: Array | None = None, train: bool = False) -> tuple[Array, routing.RoutingStats]:
        """tokens, segment_ids, positions: i32[B, S] -> (logits [B, S, V], stats)."""
        cfg = self.config
        inputs.check_batch(tokens, segment_ids, positions, cfg.vocab_size, cfg.max_seq_len)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if self.routing_config.segments == "eos":
            router_segments = routing.segments_starting_at_eos(tokens, self.routing_config.eos_id, segment_ids > 0)
        else:
            router_segments = segment_ids
        if positions is None:
            positions = segment_positions(segment_ids)
        pdtype, dtype = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        init = dense_init(cfg.init_std)

        embedding = param_with_axes(self, "embedding", init, (cfg.vocab_size, cfg.d_model), pdtype,
                                    ("vocab", "embed"))
        x = jnp.take(embedding, tokens, axis=0).astype(dtype)
        block_cls = Block
        if cfg.remat == "block":
            block_cls = nn.remat(Block, static_argnums=(5,))
        layer_stats = []
        for layer in range(cfg.n_layers):
            block = block_cls(cfg, self.routing_config, self.moe_fn, cfg.expert_counts[layer], self.attention_fn,
                              name=f"layer_{layer}")
            x, stats = block(x, segment_ids, router_segments, positions, train)
            layer_stats.append(stats)
        x = RMSNorm(cfg.norm_eps, ("norm",), pdtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = project(x, embedding.astype(dtype).T)
        else:
            head = param_with_axes(self, "lm_head", init, (cfg.d_model, cfg.vocab_size), pdtype,
                                   ("embed", "vocab"))
            logits = project(x, head.astype(dtype))
        return logits, stack_layer_stats(layer_stats)


def stack_layer_stats(layer_stats: list[routing.RoutingStats]) -> routing.RoutingStats:
    """Stacks per-layer statistics to [L, ...]. Layers of a pruned model may hold fewer
    routed experts: their per-expert sums are zero-padded to the widest layer (a zero
    count and probability add nothing to the load-balance sum)."""
    width = max(s.expert_counts.shape[-1] for s in layer_stats)

    def pad(x):
        if x.shape[-1] == width:
            return x
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])

    padded = [s._replace(expert_counts=pad(s.expert_counts), prob_sums=pad(s.prob_sums)) for s in layer_stats]
    return jax.tree.map(lambda *s: jnp.stack(s), *padded)


def build_model(config: Config, moe_fn: MoELayerFn | None = None) -> EmoTransformer:
    """The decoder of `config`; `moe_fn` defaults to the single-device MoE layer with
    the grouped-matmul backend of `config.kernels.moe_backend`; attention uses the kernel
    of `config.kernels.attention` ('auto': the one for jax's default backend)."""
    if moe_fn is None:
        moe_fn = make_moe_layer(config.kernels.moe_backend)
    attention_fn = attention_for(config.kernels.attention, config.kernels.attention_block)
    return EmoTransformer(config.model, config.routing, moe_fn, attention_fn)
