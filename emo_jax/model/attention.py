"""Multi-head causal self-attention, masked within documents, with optional QK-norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from emo_jax.config import ModelConfig
from emo_jax.kernels.attention import AttentionFn, reference_attention
from emo_jax.model import kv_cache
from emo_jax.model.layers import RMSNorm, dense_init, param_with_axes, project, rope

Array = jax.Array


class Attention(nn.Module):
    config: ModelConfig
    # (q, k, v, segment_ids) -> out, all [B, S, H, Dh]: the training / prefill kernel
    # (emo_jax.kernels.attention; config kernels.attention). Decoding with a KV cache
    # attends over the cache instead; a prefill (a mutable but empty 'cache' collection)
    # uses this kernel and stores its keys and values as the cache.
    attention_fn: AttentionFn = reference_attention

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
        """x: [B, S, D]; segment_ids, positions: i32[B, S] -> [B, S, D]."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        init = dense_init(cfg.init_std)
        qkv_shape = (cfg.d_model, cfg.n_heads, cfg.head_dim)
        qkv_axes = ("embed", "heads", "head_dim")
        x = x.astype(dtype)
        q, k, v = (
            project(x, param_with_axes(self, name, init, qkv_shape, pdtype, qkv_axes).astype(dtype))
            for name in ("q_proj", "k_proj", "v_proj"))
        if cfg.qk_norm:
            # OLMoE normalises the whole projected width, not each head separately.
            q = RMSNorm(cfg.norm_eps, ("heads", "head_dim"), pdtype, name="q_norm")(q)
            k = RMSNorm(cfg.norm_eps, ("heads", "head_dim"), pdtype, name="k_norm")(k)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        if self.has_variable("cache", "key"):
            # Incremental decoding (emo_jax.model.kv_cache): one document per row, keys at their positions.
            cache = {name: self.get_variable("cache", name) for name in ("key", "value", "valid")}
            out, cache = kv_cache.cached_attention(q, k, v, segment_ids, positions, cache)
            for name, value in cache.items():
                self.put_variable("cache", name, value)
        else:
            out = self.attention_fn(q, k, v, segment_ids)
            if self.is_mutable_collection("cache") and not self.is_initializing():
                # Prefill (emo_jax.model.kv_cache): the cache starts as these tokens' keys and values.
                for name, value in kv_cache.prefill_entries(k.astype(dtype), v.astype(dtype), segment_ids).items():
                    self.put_variable("cache", name, value)
        w_o = param_with_axes(self, "o_proj", init, (cfg.n_heads, cfg.head_dim, cfg.d_model), pdtype,
                              ("heads", "head_dim", "embed"))
        return project(out, w_o.astype(dtype), contract=2)
