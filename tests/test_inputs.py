"""Bad batches fail early in EmoTransformer.apply with an InputError naming the problem."""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_config  # noqa: E402

from emo_jax.inputs import InputError  # noqa: E402
from emo_jax.model import build_model  # noqa: E402

V, S_MAX = 512, 32


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_config("model.n_layers=1", "model.max_seq_len=32", "data.seq_len=32", "routing.pool=none")
    model = build_model(cfg)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32))
    return model, nn.meta.unbox(variables["params"])


def apply(model_and_params, tokens, seg=None, positions=None):
    model, params = model_and_params
    return model.apply({"params": params}, tokens, seg, positions, train=False)


def ok_tokens(b=2, s=8):
    return np.arange(b * s, dtype=np.int32).reshape(b, s) % V


def ok_seg():
    return np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)


def expect(mp, match, tokens, seg=None, positions=None):
    with pytest.raises(InputError, match=match) as info:
        apply(mp, tokens, seg, positions)
    return str(info.value)


def test_token_id_too_large(model_and_params):
    t = ok_tokens()
    t[1, 3] = V
    msg = expect(model_and_params, "vocab", t, ok_seg())
    assert str(V) in msg and "outside" in msg
    t[1, 3] = 10**6
    assert "1000000" in expect(model_and_params, "vocab", t, ok_seg())


def test_negative_token_id(model_and_params):
    t = ok_tokens()
    t[0, 0] = -1
    assert "-1" in expect(model_and_params, "vocab", t, ok_seg())


def test_segments_not_starting_at_one(model_and_params):
    seg = ok_seg()
    seg[1] = 2
    msg = expect(model_and_params, "starts at 2", ok_tokens(), seg)
    assert "row 1" in msg
    seg = ok_seg()
    seg[0, :3] = 0  # leading padding then a document numbered 2
    expect(model_and_params, "not 1", ok_tokens(), seg)


def test_decreasing_segments(model_and_params):
    seg = np.array([[1, 1, 2, 2, 1, 1, 0, 0], [1] * 8], np.int32)
    msg = expect(model_and_params, "decreases", ok_tokens(), seg)
    assert "row 0" in msg


def test_skipped_segment_id(model_and_params):
    seg = np.array([[1] * 8, [1, 1, 3, 3, 3, 3, 3, 3]], np.int32)
    msg = expect(model_and_params, "skips", ok_tokens(), seg)
    assert "row 1" in msg
    seg = np.array([[1] * 8, [1, 1, 0, 0, 3, 3, 0, 0]], np.int32)  # a gap across padding
    expect(model_and_params, "skips", ok_tokens(), seg)


def test_negative_segment_id(model_and_params):
    seg = ok_seg()
    seg[0, 7] = -1
    expect(model_and_params, ">= 0", ok_tokens(), seg)


def test_shape_mismatch(model_and_params):
    msg = expect(model_and_params, "segment_ids has shape", ok_tokens(), ok_seg()[:, :6])
    assert "(2, 6)" in msg and "(2, 8)" in msg
    expect(model_and_params, "segment_ids has shape", ok_tokens(), ok_seg()[:1])
    expect(model_and_params, "positions has shape", ok_tokens(), ok_seg(), np.zeros((2, 7), np.int32))


def test_one_dimensional_tokens(model_and_params):
    msg = expect(model_and_params, r"\[batch, seq\]", np.arange(8, dtype=np.int32))
    assert "(8,)" in msg
    expect(model_and_params, r"\[batch, seq\]", np.zeros((1, 2, 8), np.int32))


def test_float_tokens(model_and_params):
    msg = expect(model_and_params, "integer", ok_tokens().astype(np.float32), ok_seg())
    assert "tokens" in msg and "float32" in msg
    expect(model_and_params, "segment_ids must be an integer", ok_tokens(), ok_seg().astype(np.float32))


def test_sequence_longer_than_max_seq_len(model_and_params):
    t = np.zeros((1, S_MAX + 1), np.int32)
    msg = expect(model_and_params, "max_seq_len", t, np.ones_like(t))
    assert str(S_MAX + 1) in msg and str(S_MAX) in msg


def test_valid_inputs_with_trailing_padding_pass(model_and_params):
    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0] * 8], np.int32)
    tokens = ok_tokens(3, 8)
    logits, stats = apply(model_and_params, tokens, seg)
    assert logits.shape == (3, 8, V) and np.all(np.isfinite(np.asarray(logits)))
    assert float(stats.token_count[0]) == (seg > 0).sum()
    # also fine: padding in the middle, jnp inputs
    apply(model_and_params, jnp.asarray(tokens),
          jnp.asarray(np.array([[1, 1, 0, 2, 2, 0, 3, 0], [1] * 8, [0] * 8], np.int32)))


def test_value_checks_skipped_under_jit_but_shape_checks_kept(model_and_params):
    model, params = model_and_params
    f = jax.jit(lambda t, s: model.apply({"params": params}, t, s, train=False)[0])
    t = ok_tokens()
    t[0, 0] = V + 5  # values are not checked on tracers: documented behaviour
    with pytest.raises(InputError, match="token id"):  # ...but they are outside jit
        model.apply({"params": params}, t, ok_seg(), train=False)
    logits = f(t, ok_seg())  # no error under jit (what the bad id yields is unspecified)
    assert logits.shape == (t.shape[0], t.shape[1], V)
    with pytest.raises(InputError, match="segment_ids has shape"):
        f(ok_tokens(), ok_seg()[:, :4])
