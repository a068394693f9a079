"""Small Linen building blocks: initialisers, RMSNorm, RoPE, segment-aware masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jax.Array


def dense_init(std: float) -> nn.initializers.Initializer:
    """Truncated normal with standard deviation `std`, cut at +-3 std
    (docs/algorithm.md#architecture-of-the-released-models)."""
    return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: tuple):
    """A parameter that carries its logical axis names (nn.Partitioned metadata)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) * scale over the last `len(axes)` dims, computed in float32."""

    eps: float = 1e-6
    axes: tuple = ("norm",)
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = x.shape[-len(self.axes):]
        scale = param_with_axes(self, "scale", nn.initializers.ones, shape, self.param_dtype, self.axes)
        reduce = tuple(range(x.ndim - len(self.axes), x.ndim))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=reduce, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding (half-split convention, as in Llama/OLMo/transformers).

    x: [B, S, H, Dh]; positions: i32[B, S]. Returns x rotated, same dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def segment_positions(segment_ids: Array) -> Array:
    """Position of each token inside its segment (restarts at 0). i32[B, S] -> i32[B, S]."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def causal_segment_mask(segment_ids: Array) -> Array:
    """bool[B, 1, S, S]: query t sees key u iff u <= t and both lie in one segment.

    Padding (segment 0) only sees padding, so no row of the softmax is empty.
    """
    seq = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]
