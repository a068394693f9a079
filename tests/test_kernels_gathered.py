"""The few-copies MoE path (`kernels.gathered`: each token copy gathers its expert's
weights) against the reference layer, and `moe_layer`'s choice of it. The decode steps of
tests/test_generate.py take this path (2 prompts x 3 routed copies < 7 routed experts)
and are checked there against a full recomputation through the configured backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import moe
from emo_jax.kernels import reference
from emo_jax.kernels.gathered import moe_ffn_gathered, use_gathered
from moe_layer_check import assert_layer_matches_reference  # noqa: E402


def test_gathered_layer_matches_reference_values_and_gradients():
    assert_layer_matches_reference(moe_ffn_gathered, rtol=1e-5, atol=1e-5)


def _inputs(seed: int, tokens: int = 6, d: int = 8, h: int = 12, e: int = 10, k: int = 2):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(tokens)]), jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(tokens, k)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in ((e, d, h), (e, d, h), (e, h, d))]
    return x, ids, gates, w


def test_nan_in_padding_tokens_reaches_no_output_or_gradient():
    x, ids, gates, w = _inputs(0)
    valid = jnp.asarray([True, False, True, True, False, True])
    pad = np.flatnonzero(~np.asarray(valid))
    cot = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    f = jax.jit(jax.value_and_grad(lambda x, g, *w: jnp.sum(moe_ffn_gathered(x, ids, g, valid, *w) * cot),
                                   argnums=(0, 1, 2, 3, 4)))
    clean = f(x, gates, *w)
    dirty = f(x.at[pad].set(jnp.nan), gates.at[pad].set(jnp.nan), *w)
    np.testing.assert_array_equal(float(dirty[0]), float(clean[0]))
    for a, b in zip(dirty[1], clean[1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.any(np.asarray(moe_ffn_gathered(x.at[pad].set(jnp.nan), ids, gates, valid, *w))[pad])


def test_ids_outside_the_experts_contribute_nothing():
    x, ids, gates, w = _inputs(2)
    valid = jnp.ones(x.shape[0], bool)
    bad = ids.at[1, 0].set(2**30).at[3, 1].set(-3)
    zeroed = gates.at[1, 0].set(0.0).at[3, 1].set(0.0)
    np.testing.assert_allclose(np.asarray(moe_ffn_gathered(x, bad, gates, valid, *w)),
                               np.asarray(reference.moe_ffn(x, ids, zeroed, valid, *w)), rtol=1e-5, atol=1e-6)


def _layer_inputs(batch: int, seq: int, d: int = 8, h: int = 12, n_routed: int = 8):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(batch, seq, d)), jnp.float32)
    seg = jnp.ones((batch, seq), jnp.int32).at[0, -1].set(0)  # one padding token
    wr = jnp.asarray(rng.normal(size=(d, n_routed)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32)
         for s in ((n_routed, d, h), (n_routed, d, h), (n_routed, h, d))]
    return x, seg, wr, w


def _refuse(*args, **kwargs):
    raise AssertionError("the configured expert ffn ran")


@pytest.mark.parametrize("seq", [3, 4])  # 3 or 4 tokens x top-2 = 6 or 8 copies <= 8 experts
def test_moe_layer_gathers_per_copy_only_for_at_most_as_many_copies_as_experts(seq):
    assert use_gathered(7, 8) and use_gathered(8, 8) and not use_gathered(9, 8)
    x, seg, wr, w = _layer_inputs(batch=1, seq=seq)
    y, _ = moe.moe_layer(x, seg, None, wr, *w, routed_top_k=2, n_shared=0, ffn=_refuse)
    ids, gates, _, _ = moe.route_tokens(x, seg, None, wr, 2, 0, None)
    tokens, valid = x.reshape(-1, x.shape[-1]), (seg > 0).reshape(-1)
    want = reference.moe_ffn(tokens, ids.reshape(-1, 2), gates.reshape(-1, 2), valid, *w)
    np.testing.assert_allclose(np.asarray(y).reshape(tokens.shape), np.asarray(want), rtol=1e-5, atol=1e-6)
    x, seg, wr, w = _layer_inputs(batch=1, seq=5)  # 10 copies: the configured ffn
    with pytest.raises(AssertionError, match="configured expert ffn ran"):
        moe.moe_layer(x, seg, None, wr, *w, routed_top_k=2, n_shared=0, ffn=_refuse)
