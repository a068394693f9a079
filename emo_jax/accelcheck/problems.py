"""Random inputs of the checks and benchmarks (seeded; numpy on the host, then device arrays)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EMPTY_EXPERT = 1  # no valid token of a correctness case routes here


class MoECase(NamedTuple):
    x: jax.Array  # [T, D]
    ids: jax.Array  # i32[T, K]
    gates: jax.Array  # f32[T, K]
    valid: jax.Array  # bool[T]
    w_gate: jax.Array  # [E, D, H]
    w_up: jax.Array  # [E, D, H]
    w_down: jax.Array  # [E, H, D]
    cot: jax.Array  # [T, D], the cotangent of the output


def moe_case(t: int, k: int, e: int, d: int, h: int, dtype, seed: int = 0, padding: bool = True) -> MoECase:
    """Tokens pick k distinct experts, never EMPTY_EXPERT (its gradients must be 0). With
    `padding`, a quarter of the tokens (the first and last included) are padding: NaN
    inputs and gates, which must reach neither an output nor a gradient."""
    rng = np.random.default_rng(seed)
    choices = np.array([i for i in range(e) if i != EMPTY_EXPERT])
    ids = np.argsort(rng.random((t, len(choices))), axis=1)[:, :k]
    ids = choices[ids].astype(np.int32)
    valid = rng.random(t) >= 0.25 if padding else np.ones(t, bool)
    if padding:
        valid[[0, t - 1]] = False
    gates = rng.uniform(0.1, 1.0, size=(t, k))
    gates[~valid] = np.nan
    # The large arrays come from jax.random on the device (EMO's expert weights are 268M
    # numbers each: seconds in numpy).
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    normal = lambda key, *s, scale=1.0: (jax.random.normal(key, s, jnp.float32) * scale).astype(dtype)  # noqa: E731
    x = jnp.where(jnp.asarray(valid)[:, None], normal(keys[0], t, d), jnp.nan).astype(dtype)
    scale = 1.0 / np.sqrt(d)
    return MoECase(x, jnp.asarray(ids), jnp.asarray(gates, jnp.float32), jnp.asarray(valid),
                   normal(keys[1], e, d, h, scale=scale), normal(keys[2], e, d, h, scale=scale),
                   normal(keys[3], e, h, d, scale=scale), normal(keys[4], t, d))


def bench_routing(t: int, d: int, e: int, h: int, k: int, dtype, seed: int = 0) -> dict:
    """Uniformly random distinct experts per token, the last expert (shared) always among
    them with gate 1, as the layer adds it; no padding."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    ids = jnp.argsort(jax.random.uniform(keys[0], (t, e - 1)), axis=-1)[:, :k - 1].astype(jnp.int32)
    ids = jnp.concatenate([ids, jnp.full((t, 1), e - 1, jnp.int32)], axis=1)
    gates = jnp.concatenate([jax.random.uniform(keys[1], (t, k - 1)) / k, jnp.ones((t, 1))], axis=1)
    w = lambda kk, *s: (jax.random.normal(kk, s, jnp.float32) / np.sqrt(s[1])).astype(dtype)  # noqa: E731
    return dict(x=jax.random.normal(keys[2], (t, d), dtype), ids=ids, gates=gates.astype(jnp.float32),
                valid=jnp.ones((t,), bool), w_gate=w(keys[3], e, d, h), w_up=w(keys[4], e, d, h),
                w_down=w(keys[5], e, h, d))


def packed_segments(batch: int, seq: int, min_doc: int, max_doc: int, seed: int = 0,
                    pad: int = 0) -> np.ndarray:
    """i32[B, S]: documents of random length in [min_doc, max_doc] packed into each row
    (ids 1, 2, ...), the last `pad` tokens padding (0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    for row in range(batch):
        t, doc = 0, 1
        while t < seq - pad:
            n = min(int(rng.integers(min_doc, max_doc + 1)), seq - pad - t)
            seg[row, t:t + n] = doc
            t, doc = t + n, doc + 1
    return seg


def qkv(batch: int, seq: int, heads: int, dim: int, dtype, seed: int = 0) -> tuple[jax.Array, ...]:
    """q, k, v and an output cotangent, each [B, S, NH, HD]."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), dtype) for _ in range(4))
