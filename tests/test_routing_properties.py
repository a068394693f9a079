"""Hypothesis property tests of emo_jax.routing (docs/algorithm.md, "One MoE layer" to "Losses").

Shapes come from a short fixed list so that jit compilations are reused across
examples; the data (segments, logits, pool sizes, keys) are drawn by hypothesis.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import numpy_routing_reference as ref  # noqa: E402

from emo_jax import routing  # noqa: E402

# (B, S, N, K): B <= 3, S <= 12, N in 4..10
SHAPES = [(1, 5, 4, 2), (2, 8, 7, 3), (3, 12, 10, 3)]
PAD = 4  # padding columns added in the padding-invariance property

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

route_jit = jax.jit(routing.route, static_argnames=("top_k", "num_segments"))


# ----------------------------------------------------------------------------- strategies


@st.composite
def segment_rows(draw, batch, seq):
    """Per row: some valid tokens split into documents, then padding (segment 0)."""
    rows = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        n_valid = draw(st.integers(0, seq))
        starts = draw(st.lists(st.booleans(), min_size=n_valid, max_size=n_valid))
        doc = 0
        for t in range(n_valid):
            if t == 0 or starts[t]:
                doc += 1
            rows[b, t] = doc
    return rows


@st.composite
def routing_cases(draw, min_valid=False):
    batch, seq, n, k = draw(st.sampled_from(SHAPES))
    segs = draw(segment_rows(batch, seq))
    if min_valid and not (segs > 0).any():
        segs[0, 0] = 1  # rows are valid prefixes, so this is a one-token document
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, seq, n)) * scale).astype(np.float32)
    # pool sizes in [k_r, N + 2]: equal to k_r, mid-range and "no restriction"
    sizes = rng.integers(k, n + 3, size=(batch, seq + 1)).astype(np.int32)
    return dict(logits=logits, segs=segs, sizes=sizes, k=k, rng=rng)


def _route(case, pooled=True):
    return route_jit(jnp.asarray(case["logits"]), jnp.asarray(case["segs"]), top_k=case["k"],
                     pool_sizes=jnp.asarray(case["sizes"]) if pooled else None)


# ----------------------------------------------------------------------------- selection and gates


@SETTINGS
@given(routing_cases())
def test_selected_experts_lie_in_pool_and_gates_are_renormalised_probs(case):
    out = _route(case)
    segs, k = case["segs"], case["k"]
    expected = ref.route_reference(case["logits"], segs, k, case["sizes"])
    ids, gates, probs = (np.asarray(a) for a in (out.expert_ids, out.gates, out.probs))
    valid = segs > 0
    # padding: gates and probabilities exactly 0
    assert np.all(gates[~valid] == 0.0) and np.all(probs[~valid] == 0.0)
    # q is exactly 0 outside the pool and sums to 1 inside
    assert np.all(probs[~expected.pool_mask] == 0.0)
    if valid.any():
        np.testing.assert_allclose(probs[valid].sum(-1), 1.0, atol=1e-5)
    for b, t in zip(*np.nonzero(valid)):
        pool = expected.doc_pools[(b, int(segs[b, t]))]
        assert set(ids[b, t].tolist()) <= set(pool), (b, t, ids[b, t], pool)
        # gate = p_t(i) / sum_{j in pool} p_t(j), not renormalised over the top-k
        np.testing.assert_allclose(gates[b, t], expected.probs[b, t, ids[b, t]], atol=1e-5, rtol=0)
        assert gates[b, t].sum() <= 1.0 + 1e-5
        assert np.all(np.diff(gates[b, t]) <= 0)  # lax.top_k order
    np.testing.assert_allclose(probs, expected.probs, atol=1e-5, rtol=0)


@SETTINGS
@given(routing_cases())
def test_standard_mode_is_plain_top_k_of_softmax(case):
    out = _route(case, pooled=False)
    segs, k, logits = case["segs"], case["k"], case["logits"]
    ids, gates = np.asarray(out.expert_ids), np.asarray(out.gates)
    for b, t in zip(*np.nonzero(segs > 0)):
        p = ref.softmax64(logits[b, t])
        want = ref.ranked(p)[:k]
        assert set(ids[b, t].tolist()) == set(want)
        np.testing.assert_allclose(gates[b, t], p[want], atol=1e-5, rtol=0)
    assert np.all(gates[segs == 0] == 0.0)
    # a pool of at least N experts is no restriction at all
    big = dict(case, sizes=np.full_like(case["sizes"], logits.shape[-1]))
    pooled = _route(big)
    np.testing.assert_array_equal(np.asarray(pooled.expert_ids)[segs > 0], ids[segs > 0])
    np.testing.assert_allclose(np.asarray(pooled.gates), gates, atol=1e-6)


# ----------------------------------------------------------------------------- gradients


def _weighted_loss(logits, segs, sizes, gate_w, prob_w, z_w, k):
    out = routing.route(logits, segs, k, pool_sizes=sizes)
    return (jnp.sum(gate_w * out.gates) + jnp.sum(prob_w * out.stats.prob_sums)
            + z_w * out.stats.router_z_sum)


loss_grad = jax.jit(jax.grad(_weighted_loss), static_argnums=(6,))


@SETTINGS
@given(routing_cases(min_valid=True))
def test_out_of_pool_logits_get_exactly_zero_gradient(case):
    segs, k, logits, sizes, rng = case["segs"], case["k"], case["logits"], case["sizes"], case["rng"]
    batch, seq, n = logits.shape
    gate_w = rng.standard_normal((batch, seq, k)).astype(np.float32)
    prob_w = rng.standard_normal(n).astype(np.float32)
    z_w = np.float32(0.1)
    grad = np.asarray(loss_grad(jnp.asarray(logits), jnp.asarray(segs), jnp.asarray(sizes),
                                jnp.asarray(gate_w), jnp.asarray(prob_w), z_w, k))
    expected = ref.route_reference(logits, segs, k, sizes)
    # out-of-pool logits and every logit of a padding token: exactly 0
    assert np.all(grad[~expected.pool_mask] == 0.0), grad[~expected.pool_mask]
    # in-pool logits do get gradient (through the renormalisation)
    assert np.any(grad[expected.pool_mask] != 0.0)
    # and it is the gradient with the pool and the selection held fixed (analytic)
    # gate weights follow the descending-gate order of both routings
    want = ref.gate_logit_gradient_reference(expected, logits, gate_w, prob_w, float(z_w))
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-5)


def _pipeline(logits, score_logits, segs, sizes, weights):
    """route's pool step composed by hand so the pool choice gets its own input."""
    num_segments = sizes.shape[1]
    scores = routing.document_scores(routing.router_probs(score_logits), segs, num_segments)
    pool = routing.document_pool(scores, sizes)
    mask = routing.token_pool_mask(pool, segs)
    q = routing.pooled_probs(logits, mask) * (segs > 0)[..., None]
    return jnp.sum(weights * q ** 2), q


pipeline_grads = jax.jit(jax.grad(_pipeline, argnums=(0, 1), has_aux=True))


@jax.jit
def _score_path_grads(logits, segs, sizes):
    """Gradients of (a) a function of the document scores themselves, (b) a function that
    sees the scores only through document_pool."""
    num_segments = sizes.shape[1]

    def scores_of(z):
        return routing.document_scores(routing.router_probs(z), segs, num_segments)

    direct = jax.grad(lambda z: jnp.sum(scores_of(z) ** 2))(logits)
    through_pool = jax.grad(lambda sc: jnp.sum(jnp.where(
        routing.document_pool(sc, sizes), jax.lax.stop_gradient(sc) + 1.0, 0.0)))(scores_of(logits))
    return direct, through_pool


@SETTINGS
@given(routing_cases(min_valid=True))
def test_pool_choice_passes_no_gradient(case):
    segs, logits, sizes, rng = case["segs"], case["logits"], case["sizes"], case["rng"]
    weights = rng.standard_normal(logits.shape).astype(np.float32)
    (g_logits, g_scores), q = pipeline_grads(jnp.asarray(logits), jnp.asarray(logits),
                                             jnp.asarray(segs), jnp.asarray(sizes), jnp.asarray(weights))
    # the composition is what route computes
    np.testing.assert_allclose(np.asarray(q), np.asarray(_route(case).probs), atol=1e-6)
    assert np.all(np.asarray(g_scores) == 0.0)  # nothing through the document scores / pool
    assert np.any(np.asarray(g_logits) != 0.0)
    direct, through_pool = _score_path_grads(jnp.asarray(logits), jnp.asarray(segs), jnp.asarray(sizes))
    # document_scores itself is differentiable: the zero above comes from the pool step
    assert np.any(np.asarray(direct) != 0.0)
    # and document_pool blocks a perturbation of its scores input entirely
    assert np.all(np.asarray(through_pool) == 0.0)


# ----------------------------------------------------------------------------- padding


@SETTINGS
@given(routing_cases(), st.booleans(), st.integers(0, 2**31 - 1))
def test_padding_changes_nothing(case, at_front, seed):
    segs, k, logits, sizes = case["segs"], case["k"], case["logits"], case["sizes"]
    batch, seq, n = logits.shape
    rng = np.random.default_rng(seed)
    pad_logits = (rng.standard_normal((batch, PAD, n)) * 20).astype(np.float32)
    pad_segs = np.zeros((batch, PAD), np.int32)
    parts = ([pad_logits, logits], [pad_segs, segs]) if at_front else ([logits, pad_logits], [segs, pad_segs])
    big = dict(case, logits=np.concatenate(parts[0], 1), segs=np.concatenate(parts[1], 1))
    keep = slice(PAD, None) if at_front else slice(0, seq)
    for pooled in (False, True):
        small_out, big_out = _route(case, pooled), _route(big, pooled)
        for name in ("expert_counts", "token_count", "pool_size_sum", "document_count"):
            np.testing.assert_array_equal(np.asarray(getattr(big_out.stats, name)),
                                          np.asarray(getattr(small_out.stats, name)), err_msg=name)
        for name in ("prob_sums", "router_z_sum"):
            np.testing.assert_allclose(np.asarray(getattr(big_out.stats, name)),
                                       np.asarray(getattr(small_out.stats, name)),
                                       rtol=1e-6, atol=1e-6, err_msg=name)
        assert np.all(np.asarray(big_out.gates)[:, (slice(0, PAD) if at_front else slice(seq, None))] == 0.0)
        np.testing.assert_allclose(np.asarray(big_out.gates)[:, keep], np.asarray(small_out.gates), atol=1e-6)
        valid = segs > 0
        np.testing.assert_array_equal(np.asarray(big_out.expert_ids)[:, keep][valid],
                                      np.asarray(small_out.expert_ids)[valid])
    # and the (pooled) stats agree with the reference, which never looks at padding
    expected = ref.route_reference(big["logits"], big["segs"], k, sizes).stats
    np.testing.assert_array_equal(np.asarray(big_out.stats.expert_counts), expected.expert_counts)
    np.testing.assert_allclose(np.asarray(big_out.stats.prob_sums), expected.prob_sums,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(big_out.stats.router_z_sum), expected.router_z_sum,
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- pool-size randomness


POOL_MIN, POOL_MAX = 4, 12  # for B = 3, G = 13 slots


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(0, 1000))
def test_same_key_same_pools_other_layer_other_pools(seed, layer):
    batch, seq, n, k = SHAPES[-1]
    key = jax.random.key(seed)
    draw = lambda kk: np.asarray(routing.pool_sizes_for_mode(  # noqa: E731
        "random", kk, batch, seq + 1, 0, POOL_MIN, POOL_MAX))
    first, again = draw(jax.random.fold_in(key, layer)), draw(jax.random.fold_in(key, layer))
    np.testing.assert_array_equal(first, again)
    other = draw(jax.random.fold_in(key, layer + 1))
    assert first.min() >= POOL_MIN and first.max() <= POOL_MAX
    # 39 independent entries over 9 values: equal everywhere has probability 9**-39
    assert not np.array_equal(first, other)
    assert len(np.unique(first)) > 1  # one draw per (document, layer), not one per layer
    # same key -> same routing
    rng = np.random.default_rng(seed)
    case = dict(logits=(rng.standard_normal((batch, seq, n))).astype(np.float32),
                segs=np.repeat(np.repeat(np.arange(1, 5), 3)[None], batch, 0).astype(np.int32),
                sizes=first, k=k)
    a, b = _route(case), _route(dict(case, sizes=again))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pool_sizes_uniform_and_independent_across_layers():
    """d ~ UniformInt[d_min, d_max] per (document, layer): over many layer keys the
    sizes cover the range uniformly (loose chi-square) and layers are uncorrelated."""
    pool_min, pool_max = 8, 128  # the released values
    values = pool_max - pool_min + 1
    layers, batch, slots = 48, 16, 33
    key = jax.random.key(1234)
    draws = np.stack([np.asarray(routing.pool_sizes_for_mode(
        "random", jax.random.fold_in(key, layer), batch, slots, 32, pool_min, pool_max))
        for layer in range(layers)])
    assert draws.min() == pool_min and draws.max() == pool_max
    counts = np.bincount(draws.reshape(-1) - pool_min, minlength=values)
    assert counts.shape == (values,) and np.all(counts > 0)
    expected = draws.size / values
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # dof = 120: mean 120, sd ~15.5; 220 is > 6 sd
    assert chi2 < 220, chi2
    # layers are independent: ~1/121 of entries agree between two layers, no correlation
    flat = draws.reshape(layers, -1).astype(np.float64)
    agree = np.mean(flat[:-1] == flat[1:])
    assert agree < 0.03, agree
    corr = np.corrcoef(flat)[np.triu_indices(layers, 1)]
    assert np.max(np.abs(corr)) < 0.15, np.max(np.abs(corr))
    # rows and documents within a layer are not copies of each other
    assert not np.any([np.array_equal(draws[0, 0], draws[0, r]) for r in range(1, batch)])
    # mean close to (min + max) / 2
    assert abs(draws.mean() - (pool_min + pool_max) / 2) < 1.5
