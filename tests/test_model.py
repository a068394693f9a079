"""The Linen decoder: document-masked causal attention, positions, RoPE, variants, init,
logical axis metadata, routing statistics, dtypes."""

from __future__ import annotations

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

sys.path.insert(0, os.path.dirname(__file__))
from helpers import segment_positions_np, tiny_config  # noqa: E402

from emo_jax.model import build_model  # noqa: E402
from emo_jax.model.layers import project, rope, segment_positions  # noqa: E402

B, S = 2, 24
BASE = ("data.seq_len=24", "model.max_seq_len=32")


@functools.lru_cache(maxsize=None)
def _setup(overrides, seed):
    cfg = tiny_config(*BASE, *overrides)
    model = build_model(cfg)
    variables = jax.jit(model.init)({"params": jax.random.PRNGKey(seed), "routing": jax.random.PRNGKey(1)},
                                    jnp.zeros((1, S), jnp.int32))
    return cfg, model, variables


def setup(*overrides, seed=0):
    """Config, model and boxed variables; cached so that every test reuses one compile."""
    return _setup(("model.n_layers=1",) + overrides, seed)


@functools.lru_cache(maxsize=None)
def make_apply(model, train=True):
    @jax.jit
    def apply(params, tokens, seg, positions=None):
        return model.apply({"params": params}, tokens, seg, positions, train=train,
                           rngs={"routing": jax.random.PRNGKey(7)})
    return apply


def unboxed(variables):
    return nn.meta.unbox(variables["params"])


def doc_batch(rng, vocab=512):
    tokens = rng.integers(1, vocab, size=(B, S)).astype(np.int32)
    seg = np.zeros((B, S), np.int32)
    seg[0, :10], seg[0, 10:20] = 1, 2  # row 0: two documents + padding
    seg[1, :7], seg[1, 7:15], seg[1, 15:] = 1, 2, 3
    return tokens, seg


# ------------------------------------------------------------------ attention isolation


@pytest.fixture(scope="module", params=["fixed", "none"])
def pooled_model(request):
    cfg, model, variables = setup(f"routing.pool={request.param}", "routing.pool_size=4", "model.n_layers=2")
    return cfg, model, unboxed(variables)


def test_documents_do_not_see_each_other(pooled_model):
    cfg, model, params = pooled_model
    apply = make_apply(model)
    rng = np.random.default_rng(0)
    tokens, seg = doc_batch(rng)
    logits, _ = apply(params, tokens, seg)
    changed = tokens.copy()
    changed[0, 10:20] = rng.integers(1, 512, size=10)  # document 2 of row 0
    changed[1, 7:15] = rng.integers(1, 512, size=8)  # document 2 of row 1
    logits2, _ = apply(params, changed, seg)
    l1, l2 = np.asarray(logits), np.asarray(logits2)
    np.testing.assert_allclose(l2[0, :10], l1[0, :10], atol=1e-6, rtol=0)
    np.testing.assert_allclose(l2[1, :7], l1[1, :7], atol=1e-6, rtol=0)
    np.testing.assert_allclose(l2[1, 15:], l1[1, 15:], atol=1e-6, rtol=0)  # document 3
    assert np.abs(l2[0, 10:20] - l1[0, 10:20]).max() > 1e-3  # the edit does matter
    assert np.abs(l2[1, 7:15] - l1[1, 7:15]).max() > 1e-3


def test_rows_do_not_see_each_other(pooled_model):
    cfg, model, params = pooled_model
    apply = make_apply(model)
    rng = np.random.default_rng(1)
    tokens, seg = doc_batch(rng)
    changed = tokens.copy()
    changed[1] = rng.integers(1, 512, size=S)
    l1, l2 = (np.asarray(apply(params, t, seg)[0]) for t in (tokens, changed))
    np.testing.assert_allclose(l2[0], l1[0], atol=1e-6, rtol=0)


def test_attention_is_causal_without_pool():
    cfg, model, variables = setup("routing.pool=none")
    apply = make_apply(model)
    params = unboxed(variables)
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 512, size=(B, S)).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    l1 = np.asarray(apply(params, tokens, seg)[0])
    for t in (5, 17):
        changed = tokens.copy()
        changed[:, t] = (changed[:, t] + 101) % 512
        l2 = np.asarray(apply(params, changed, seg)[0])
        np.testing.assert_allclose(l2[:, :t], l1[:, :t], atol=1e-6, rtol=0)
        assert np.abs(l2[:, t:] - l1[:, t:]).max(axis=-1).min() > 1e-4  # every later position moves


# ------------------------------------------------------------------ positions and RoPE


def test_segment_positions_restart_per_document():
    rng = np.random.default_rng(3)
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2], [1] * 8, [0] * 8], np.int32)
    np.testing.assert_array_equal(np.asarray(segment_positions(jnp.asarray(seg)))[:3],
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6], list(range(8))])
    for _ in range(5):
        lengths = rng.integers(1, 9, size=10)
        row = np.repeat(np.arange(1, 11), lengths)[:40]
        row = np.pad(row, (0, 40 - len(row)))[None].astype(np.int32)
        got = np.asarray(segment_positions(jnp.asarray(row)))
        valid = row > 0
        np.testing.assert_array_equal(got[valid], segment_positions_np(row)[valid])


def rope_np(x, positions, theta):
    """Half-split rotary embedding in float64 numpy: pairs (i, i + Dh/2)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        freq = theta ** (-2.0 * i / x.shape[-1])
        ang = np.asarray(positions, np.float64)[:, :, None] * freq  # [B, S, 1]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(ang) - b * np.sin(ang)
        out[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
    return out


@pytest.mark.parametrize("theta", [10_000.0, 500_000.0])
def test_rope_matches_numpy(theta):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 7, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 4096, size=(2, 7)).astype(np.int32)
    got = np.asarray(jax.jit(rope, static_argnums=2)(jnp.asarray(x), jnp.asarray(pos), theta))
    np.testing.assert_allclose(got, rope_np(x, pos, theta), atol=2e-3, rtol=0)  # angles up to 4096 rad in f32
    small = rng.integers(0, 64, size=(2, 7)).astype(np.int32)
    got = np.asarray(rope(jnp.asarray(x), jnp.asarray(small), theta))
    np.testing.assert_allclose(got, rope_np(x, small, theta), atol=2e-5, rtol=0)
    assert np.abs(got - x).max() > 0.1  # it does rotate
    assert rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(small), theta).dtype == jnp.bfloat16


@pytest.mark.parametrize("spec,x_shape,w_shape,contract", [
    ("bsd,dv->bsv", (2, 5, 6), (6, 7), 1),
    ("bsd,dhk->bshk", (2, 5, 6), (6, 3, 4), 1),
    ("bshk,hkd->bsd", (2, 5, 3, 4), (3, 4, 6), 2),
])
def test_project_equals_the_einsum_forward_and_gradients(spec, x_shape, w_shape, contract):
    """The attention projections and the LM head use `project` (one 2-D matmul) instead of
    the batched einsum; the product and both gradients are the einsum's."""
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(3), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    cot = jax.random.normal(kc, jnp.einsum(spec, x, w).shape)
    np.testing.assert_allclose(project(x, w, contract), jnp.einsum(spec, x, w), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda x, w: jnp.sum(project(x, w, contract) * cot), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * cot), argnums=(0, 1))(x, w)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_project_names_dims_that_do_not_match():
    with pytest.raises(ValueError, match=r"do not share 2 contracted dims"):
        project(jnp.zeros((2, 3, 4, 5)), jnp.zeros((4, 6, 7)), contract=2)


def test_model_uses_relative_positions():
    cfg, model, variables = setup("routing.pool=none")
    apply = make_apply(model)
    params = unboxed(variables)
    tokens, seg = doc_batch(np.random.default_rng(5))
    base = segment_positions_np(seg)
    l0 = np.asarray(apply(params, tokens, seg)[0])
    l_expl = np.asarray(apply(params, tokens, seg, base)[0])
    np.testing.assert_allclose(l_expl, l0, atol=1e-6)  # default positions = per-document positions
    l_shift = np.asarray(apply(params, tokens, seg, base + 11)[0])
    np.testing.assert_allclose(l_shift, l0, atol=2e-4)  # RoPE: only offsets matter
    l_bad = np.asarray(apply(params, tokens, seg, np.tile(np.arange(S), (B, 1)) * 3)[0])
    assert np.abs(l_bad - l0).max() > 1e-3  # and positions are used at all


# ------------------------------------------------------------------ architecture variants


def test_tied_embeddings_equal_untied_head_set_to_embedding():
    _, m_untied, v_untied = setup("routing.pool=none")
    _, m_tied, v_tied = setup("routing.pool=none", "model.tie_embeddings=true")
    p_tied = unboxed(v_tied)
    assert "lm_head" not in p_tied and "lm_head" in unboxed(v_untied)
    p_untied = dict(p_tied, lm_head=p_tied["embedding"].T)
    tokens, seg = doc_batch(np.random.default_rng(6))
    lt = np.asarray(make_apply(m_tied)(p_tied, tokens, seg)[0])
    lu = np.asarray(make_apply(m_untied)(p_untied, tokens, seg)[0])
    np.testing.assert_allclose(lt, lu, atol=1e-6)
    lu_own = np.asarray(make_apply(m_untied)(unboxed(v_untied), tokens, seg)[0])
    assert np.abs(lu_own - lt).max() > 1e-3


def scaled(params, factor, names):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: (v * factor if k[-1] in names else v) for k, v in flat.items()})


def test_qk_norm_makes_logits_invariant_to_qk_scale():
    _, m_plain, v_plain = setup("routing.pool=none")
    _, m_qk, v_qk = setup("routing.pool=none", "model.qk_norm=true")
    p_qk = unboxed(v_qk)
    for layer in ("layer_0",):
        attn = p_qk[layer]["attention"]
        assert attn["q_norm"]["scale"].shape == (4, 16) and attn["k_norm"]["scale"].shape == (4, 16)
    p_plain = {k: v for k, v in p_qk.items()}
    p_plain = jax.tree.map(lambda x: x, unboxed(v_plain))
    tokens, seg = doc_batch(np.random.default_rng(7))
    apply_qk, apply_plain = make_apply(m_qk), make_apply(m_plain)
    l_qk = np.asarray(apply_qk(p_qk, tokens, seg)[0])
    l_qk_scaled = np.asarray(apply_qk(scaled(p_qk, 7.0, ("q_proj", "k_proj")), tokens, seg)[0])
    np.testing.assert_allclose(l_qk_scaled, l_qk, atol=2e-5)
    # without QK-norm the same scaling changes the attention (and the logits)
    l = np.asarray(apply_plain(p_plain, tokens, seg)[0])
    l_scaled = np.asarray(apply_plain(scaled(p_plain, 7.0, ("q_proj", "k_proj")), tokens, seg)[0])
    assert np.abs(l_scaled - l).max() > 1e-3
    # QK-norm with unit scales is not the identity: the model output differs from plain
    p_same = scaled(p_qk, 1.0, ())
    for layer in ("layer_0",):
        p_same[layer]["attention"] = {k: v for k, v in p_same[layer]["attention"].items()
                                      if k not in ("q_norm", "k_norm")}
    l_same = np.asarray(apply_plain(p_same, tokens, seg)[0])
    assert np.abs(l_same - l_qk).max() > 1e-3


def test_post_norm_is_invariant_to_sublayer_output_scale():
    # eps ~ 0 so that the norms are exactly scale-invariant (the sublayer outputs at init
    # are far smaller than sqrt(1e-6))
    _, m_pre, v = setup("routing.pool=none", "model.norm_eps=1.0e-20")
    _, m_post, _ = setup("routing.pool=none", "model.norm_placement=post", "model.norm_eps=1.0e-20")
    params = unboxed(v)
    tokens, seg = doc_batch(np.random.default_rng(8))
    apply_pre, apply_post = make_apply(m_pre), make_apply(m_post)
    big = scaled(params, 9.0, ("o_proj", "w_down"))
    l_post, l_post_big = (np.asarray(apply_post(p, tokens, seg)[0]) for p in (params, big))
    np.testing.assert_allclose(l_post_big, l_post, atol=5e-5)  # x + norm(f(x))
    l_pre, l_pre_big = (np.asarray(apply_pre(p, tokens, seg)[0]) for p in (params, big))
    assert np.abs(l_pre_big - l_pre).max() > 1e-3  # x + f(norm(x))
    assert np.abs(l_post - l_pre).max() > 1e-3


# ------------------------------------------------------------------ init and metadata


def test_init_truncated_normal_and_unit_norms():
    cfg, _, variables = setup("model.d_model=128", "model.expert_hidden=128")
    flat = traverse_util.flatten_dict(unboxed(variables))
    std = cfg.model.init_std
    n_kernels = n_norms = 0
    for path, w in flat.items():
        w = np.asarray(w, np.float64)
        if path[-1] == "scale":
            np.testing.assert_array_equal(w, 1.0)
            n_norms += 1
            continue
        n_kernels += 1
        assert np.abs(w).max() <= 3 * std * (1 + 1e-6), path  # truncated at 3 sigma
        assert 0.9 * std < w.std() < 1.02 * std, (path, w.std())
        assert abs(w.mean()) < 5 * std / np.sqrt(w.size) + 1e-9, path
    # embedding, lm_head, final norm, and per layer: 2 norms, q/k/v/o, router + 3 expert weights
    assert n_kernels == 2 + cfg.model.n_layers * 8
    assert n_norms == 1 + cfg.model.n_layers * 2
    # different parameters are drawn independently
    assert not np.allclose(flat[("layer_0", "moe", "w_gate")], flat[("layer_0", "moe", "w_up")])


def test_every_parameter_has_logical_axis_names():
    _, _, variables = setup("routing.pool=none", "model.qk_norm=true")
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 10
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    flat = traverse_util.flatten_dict(variables["params"], is_leaf=lambda k, x: isinstance(x, nn.Partitioned))
    assert flat[("embedding",)].names == ("vocab", "embed")
    assert flat[("layer_0", "moe", "w_gate")].names[0] == "exp"


def test_routing_stats_are_stacked_per_layer():
    cfg, model, variables = setup("routing.pool=fixed", "routing.pool_size=4", "model.n_layers=2")
    tokens, seg = doc_batch(np.random.default_rng(9))
    _, stats = make_apply(model)(unboxed(variables), tokens, seg)
    L, N, K = 2, cfg.model.n_routed_experts, cfg.model.routed_top_k
    assert stats.expert_counts.shape == (L, N) and stats.prob_sums.shape == (L, N)
    for f in ("token_count", "router_z_sum", "pool_size_sum", "document_count"):
        assert getattr(stats, f).shape == (L,), f
    n_valid = (seg > 0).sum()
    np.testing.assert_array_equal(np.asarray(stats.token_count), n_valid)
    np.testing.assert_array_equal(np.asarray(stats.expert_counts).sum(-1), n_valid * K)
    np.testing.assert_array_equal(np.asarray(stats.document_count), 5)


# ------------------------------------------------------------------ dtypes


def test_bfloat16_compute_close_to_float32():
    _, m32, v = setup("routing.pool=none")
    _, m16, _ = setup("routing.pool=none", "model.dtype=bfloat16")
    params = unboxed(v)
    tokens, seg = doc_batch(np.random.default_rng(10))
    l32 = np.asarray(make_apply(m32)(params, tokens, seg)[0], np.float32)
    l16 = np.asarray(make_apply(m16)(params, tokens, seg)[0].astype(jnp.float32))
    assert make_apply(m16)(params, tokens, seg)[0].dtype == jnp.bfloat16
    assert np.all(np.isfinite(l16))
    rel = np.linalg.norm(l16 - l32) / np.linalg.norm(l32)
    assert rel < 0.05, rel
    assert rel > 0  # it really computed in bf16


def test_router_params_stay_float32():
    _, _, v = setup("model.param_dtype=bfloat16", "model.dtype=bfloat16")
    flat = traverse_util.flatten_dict(unboxed(v))
    for path, w in flat.items():
        expected = jnp.float32 if path[-1] == "router" else jnp.bfloat16
        assert w.dtype == expected, (path, w.dtype)
    assert sum(p[-1] == "router" for p in flat) == 1
