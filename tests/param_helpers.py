"""Test helpers for models given as parameter trees: random parameters without compiling
the model, and a jitted forward pass (eager op-by-op dispatch is slow on CPU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.model import build_model
from emo_jax.param_count import abstract_params


def random_params(config, seed: int = 0, std: float = 0.5) -> dict:
    """Normal(0, std) values in the model's parameter shapes and dtypes (norms included)."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(abstract_params(config))
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, std, a.shape).astype(a.dtype)), abstract)


@functools.lru_cache(maxsize=16)
def _forward(config):
    model = build_model(config)
    return jax.jit(lambda p, t, s: model.apply({"params": p}, t, s)[0])


def logits(config, params, tokens, segment_ids) -> np.ndarray:
    """float32 logits [B, S, V] of tokens/segment_ids [B, S] (no positions: per-document)."""
    return np.asarray(_forward(config)(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(segment_ids, jnp.int32)))
