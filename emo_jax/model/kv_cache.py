"""Key/value cache for incremental decoding, as plain arrays in a Flax 'cache' collection.

Slot t of a row's cache holds the keys and values of the token at position t of that
row (one document per row: segment ids only mark padding here). A call writes its
tokens' keys/values at their positions and attends to every valid slot at or before
each query's position, so many tokens and one token go through the same code.
`valid` marks written, non-padding slots: a right-padded prompt leaves its padding
slots invalid, and the first generated token overwrites the first of them.

Attention switches to this path when the model is applied with a 'cache'
collection: `model.apply({'params': p, 'cache': c}, ..., mutable=['cache'])`.

Prefill without the cache mask (what `emo_jax.generate` does): applied with
`mutable=['cache']` but no cache, the model runs the prompt through its training
attention kernel (blocked, splash or flash: no [B, 1, S, T] mask, memory linear in the
prompt) and returns a cache holding exactly the prompt's keys and values
(`prefill_entries`); `extend` then appends the empty slots the decoding needs. Such a
call must hold one document per row starting at position 0 (right-padded prompts,
positions 0..S-1, segment id 1 on every real token). Any apply with the 'cache'
collection mutable (`mutable=True` included) and no cache returns such a cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emo_jax.config import ModelConfig

Array = jax.Array


def init_cache(config: ModelConfig, batch: int, length: int) -> dict:
    """An empty cache collection for `batch` rows of up to `length` tokens.

    Paths mirror the model's modules: {'layer_l': {'attention': {key, value, valid}}};
    key/value: [B, T, H, Dh] in the compute dtype, valid: bool[B, T].
    """
    dtype = jnp.dtype(config.dtype)
    shape = (batch, length, config.n_heads, config.head_dim)
    return {f"layer_{layer}": {"attention": {
        "key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, length), bool)}} for layer in range(config.n_layers)}


def prefill_entries(k: Array, v: Array, segment_ids: Array) -> dict:
    """A layer's cache holding exactly a prompt that starts at position 0: k, v
    [B, S, H, Dh]; segment_ids i32[B, S] (0 = padding, stored as invalid)."""
    return {"key": k, "value": v, "valid": segment_ids > 0}


def extend(cache: dict, extra: int) -> dict:
    """Every layer's cache with `extra` empty (invalid) slots appended: [B, T, ...] ->
    [B, T + extra, ...]."""
    def pad(x: Array) -> Array:
        return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    return jax.tree.map(pad, cache)


def write(cache: Array, new: Array, positions: Array) -> Array:
    """cache[b, positions[b, s]] = new[b, s]. cache: [B, T, ...]; new: [B, S, ...]; positions: i32[B, S]."""
    rows = jnp.arange(cache.shape[0], dtype=jnp.int32)[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype))


def cache_mask(valid: Array, positions: Array) -> Array:
    """bool[B, 1, S, T]: query s sees slot t iff t is valid and t <= its position.

    valid: bool[B, T] (after this call's writes); positions: i32[B, S].
    """
    slots = jnp.arange(valid.shape[1], dtype=jnp.int32)
    mask = valid[:, None, :] & (slots[None, None, :] <= positions[:, :, None])
    return mask[:, None]


def cached_attention(q: Array, k: Array, v: Array, segment_ids: Array, positions: Array,
                     cache: dict) -> tuple[Array, dict]:
    """Attention of the new tokens over the cache after writing them into it.

    q, k, v: [B, S, H, Dh] (RoPE applied); segment_ids: i32[B, S] (0 = padding, not
    stored as valid); cache: {key, value, valid}. Returns ([B, S, H, Dh], new cache).
    """
    new = {
        "key": write(cache["key"], k, positions),
        "value": write(cache["value"], v, positions),
        "valid": write(cache["valid"], segment_ids > 0, positions),
    }
    mask = cache_mask(new["valid"], positions)
    # A padding query may see no valid slot (an empty softmax row); its output is unused.
    out = jax.nn.dot_product_attention(q, new["key"].astype(q.dtype), new["value"].astype(q.dtype), mask=mask)
    return out, new
