"""Small Linen building blocks: initialisers, projections, RMSNorm, RoPE, segment-aware masks."""

from __future__ import annotations

import math

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


def project(x: Array, w: Array, contract: int = 1) -> Array:
    """x [..., c_1..c_n] contracted with w [c_1..c_n, o...] -> [..., o...], as one 2-D matmul.

    The same product as `jnp.einsum("bsd,dv->bsv", x, w)` (or "bshk,hkd->bsd" with
    contract=2), but with the leading dims of x and the output dims of w merged first. On
    XLA:CPU (jax 0.10.2) the einsum's weight gradient, which contracts over both batch and
    sequence, ran 1.3-3.6x slower than the flattened [B*S, D] x [D, V] product (the LM head
    at S1: 322 vs 89 ms for jit(grad); `benchmarks/bench_cpu_parts.py --sections projection`,
    BUILD_NOTES.md, "Fourth session").
    """
    if x.shape[x.ndim - contract:] != w.shape[:contract]:
        raise ValueError(f"project: x {x.shape} and w {w.shape} do not share {contract} contracted dims")
    lead, inner, out = x.shape[:x.ndim - contract], math.prod(w.shape[:contract]), w.shape[contract:]
    y = x.reshape(-1, inner) @ w.reshape(inner, -1)
    return y.reshape(*lead, *out)


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
