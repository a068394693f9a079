"""emo_jax.routing against the independent NumPy reference (tests/numpy_routing_reference.py)."""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import numpy_routing_reference as ref  # noqa: E402

from emo_jax import losses, routing  # noqa: E402

B, S, N, K = 4, 16, 10, 3
G = S + 1

route_jit = jax.jit(routing.route, static_argnames=("top_k", "num_segments"))


# ----------------------------------------------------------------------------- inputs


def make_row(rng, seq, layout):
    """Segment ids of one row. layout: 'multi' (several documents, padding at the end),
    'full' (several documents, no padding), 'piece' (the row is one piece of a document
    that continues in the next row), 'pad' (all padding), 'single_token_docs'."""
    row = np.zeros(seq, dtype=np.int32)
    if layout == "pad":
        return row
    if layout == "piece":
        row[:] = 1
        return row
    if layout == "single_token_docs":
        n_valid = seq - 3
        row[:n_valid] = np.arange(1, n_valid + 1)
        return row
    n_valid = seq if layout == "full" else int(rng.integers(seq // 2, seq - 1))
    n_docs = int(rng.integers(2, 5))
    cuts = np.sort(rng.choice(np.arange(1, n_valid), size=n_docs - 1, replace=False))
    doc = 1
    for t in range(n_valid):
        if doc - 1 < len(cuts) and t == cuts[doc - 1]:
            doc += 1
        row[t] = doc
    return row


def make_segments(rng, layouts, seq=S):
    return np.stack([make_row(rng, seq, layout) for layout in layouts])


def make_logits(rng, shape, scale=2.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_pool_sizes(rng, regime, batch=B, slots=G, n=N, k=K):
    if regime == "k":
        return np.full((batch, slots), k, np.int32)
    if regime == "mid":
        return rng.integers(k + 1, n, size=(batch, slots)).astype(np.int32)
    if regime == "all":
        return rng.integers(n, n + 5, size=(batch, slots)).astype(np.int32)
    if regime == "mixed":
        return rng.integers(k, n + 3, size=(batch, slots)).astype(np.int32)
    raise ValueError(regime)


# ----------------------------------------------------------------------------- checks


def assert_matches_reference(out, expected, segment_ids, top_k):
    ids = np.asarray(out.expert_ids)
    gates = np.asarray(out.gates)
    probs = np.asarray(out.probs)
    batch, seq = segment_ids.shape
    assert ids.dtype == np.int32
    assert ids.shape == gates.shape == (batch, seq, top_k)
    assert probs.shape == expected.probs.shape
    np.testing.assert_allclose(probs, expected.probs, atol=1e-5, rtol=0)
    for b in range(batch):
        for t in range(seq):
            if segment_ids[b, t] == 0:
                assert np.all(gates[b, t] == 0.0), (b, t, gates[b, t])
                assert np.all(probs[b, t] == 0.0), (b, t)
                continue
            want = expected.expert_ids[b][t]
            assert set(ids[b, t].tolist()) == set(want), (b, t, ids[b, t], want)
            # lax.top_k order: descending gate
            np.testing.assert_allclose(gates[b, t], expected.gates[b, t], atol=1e-5, rtol=0)
            # every gate is the renormalised probability of its expert
            np.testing.assert_allclose(gates[b, t], probs[b, t, ids[b, t]], atol=0, rtol=0)
    assert_stats_match(out.stats, expected.stats)


def assert_stats_match(stats, expected):
    np.testing.assert_array_equal(np.asarray(stats.expert_counts), expected.expert_counts)
    np.testing.assert_allclose(np.asarray(stats.prob_sums), expected.prob_sums, rtol=1e-4, atol=1e-5)
    for name in ("token_count", "router_z_sum", "pool_size_sum", "document_count"):
        np.testing.assert_allclose(float(getattr(stats, name)), getattr(expected, name),
                                   rtol=1e-4, atol=1e-6, err_msg=name)


LAYOUTS = ("multi", "piece", "full", "multi")


# ----------------------------------------------------------------------------- reference sanity


def test_reference_hand_computed_example():
    """Pins the reference itself on a case small enough to work out by hand."""
    logits = np.log(np.array([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.3, 0.15, 0.05], [0.1, 0.1, 0.7, 0.1]]]))
    seg = np.array([[1, 1, 0]])
    # document 1 score = mean([.1,.2,.3,.4],[.5,.3,.15,.05]) = [.3,.25,.225,.225], so a
    # pool of 2 is {0, 1}; the padding token (which prefers expert 2) is ignored.
    r = ref.route_reference(logits, seg, top_k=1, pool_sizes=np.array([[4, 2]]))
    assert r.doc_pools[(0, 1)] == [0, 1]
    np.testing.assert_allclose(r.probs[0, 0], [1 / 3, 2 / 3, 0, 0])
    np.testing.assert_allclose(r.probs[0, 1], [5 / 8, 3 / 8, 0, 0])
    assert r.expert_ids[0][0] == [1] and r.expert_ids[0][1] == [0]
    np.testing.assert_allclose(r.gates[0, :2, 0], [2 / 3, 5 / 8])
    assert r.expert_ids[0][2] is None and np.all(r.gates[0, 2] == 0)
    np.testing.assert_array_equal(r.stats.expert_counts, [1, 1, 0, 0])
    np.testing.assert_allclose(r.stats.prob_sums, [1 / 3 + 5 / 8, 2 / 3 + 3 / 8, 0, 0])
    assert r.stats.token_count == 2 and r.stats.document_count == 1 and r.stats.pool_size_sum == 2
    np.testing.assert_allclose(r.stats.router_z_sum, math.log(0.3) ** 2 + math.log(0.8) ** 2)
    lb = ref.load_balance_loss_reference(r.stats.expert_counts, r.stats.prob_sums, 2, 4, 1)
    np.testing.assert_allclose(lb, 4 * (0.5 * (1 / 3 + 5 / 8) / 2 + 0.5 * (2 / 3 + 3 / 8) / 2))
    # perfect balance gives 1.0
    assert ref.load_balance_loss_reference([2, 2, 2, 2], [2, 2, 2, 2], 8, 4, 1) == pytest.approx(1.0)

    out = route_jit(jnp.asarray(logits, jnp.float32), jnp.asarray(seg), top_k=1,
                    pool_sizes=jnp.array([[4, 2]]))
    assert_matches_reference(out, r, seg, 1)


# ----------------------------------------------------------------------------- route vs reference


@pytest.mark.parametrize("regime", ["k", "mid", "all", "mixed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_route_pooled_matches_reference(regime, seed):
    rng = np.random.default_rng(100 * seed + len(regime))
    segs = make_segments(rng, LAYOUTS)
    logits = make_logits(rng, (B, S, N))
    sizes = make_pool_sizes(rng, regime)
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    expected = ref.route_reference(logits, segs, K, sizes)
    assert_matches_reference(out, expected, segs, K)
    if regime == "k":
        # pool of exactly k_r: the selection is the whole pool
        for b in range(B):
            for t in range(S):
                if segs[b, t]:
                    assert sorted(np.asarray(out.expert_ids[b, t]).tolist()) == \
                        expected.doc_pools[(b, int(segs[b, t]))]


def test_route_edge_layouts_match_reference():
    """An all-padding row and a row of one-token documents."""
    rng = np.random.default_rng(7)
    segs = make_segments(rng, ("pad", "single_token_docs", "multi", "piece"))
    logits = make_logits(rng, (B, S, N), scale=4.0)
    sizes = make_pool_sizes(rng, "mixed")
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    expected = ref.route_reference(logits, segs, K, sizes)
    assert_matches_reference(out, expected, segs, K)
    assert float(out.stats.document_count) == expected.stats.document_count


@pytest.mark.parametrize("seed", [0, 1])
def test_route_standard_mode_matches_reference(seed):
    rng = np.random.default_rng(50 + seed)
    segs = make_segments(rng, ("multi", "piece", "pad", "full"))
    logits = make_logits(rng, (B, S, N))
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K)
    expected = ref.route_reference(logits, segs, K, None)
    assert_matches_reference(out, expected, segs, K)
    # standard MoE: q = p = softmax over all routed experts on every valid token
    valid = segs > 0
    p = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    np.testing.assert_allclose(np.asarray(out.probs)[valid], np.asarray(p)[valid], atol=1e-6)
    assert float(out.stats.pool_size_sum) == N * expected.stats.document_count


def test_pool_at_least_n_equals_standard_mode():
    rng = np.random.default_rng(3)
    segs = make_segments(rng, LAYOUTS)
    logits = make_logits(rng, (B, S, N))
    sizes = make_pool_sizes(rng, "all")
    pooled = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    plain = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K)
    np.testing.assert_array_equal(np.asarray(pooled.expert_ids)[segs > 0],
                                  np.asarray(plain.expert_ids)[segs > 0])
    np.testing.assert_allclose(np.asarray(pooled.gates), np.asarray(plain.gates), atol=1e-6)
    for name in routing.RoutingStats._fields:
        np.testing.assert_allclose(np.asarray(getattr(pooled.stats, name)),
                                   np.asarray(getattr(plain.stats, name)), rtol=1e-5, err_msg=name)


def test_compact_segment_slots_match_reference():
    """G = max documents + 1 instead of S + 1 (pool_sizes fixes G)."""
    rng = np.random.default_rng(11)
    segs = make_segments(rng, ("multi", "multi", "piece", "full"))
    g = int(segs.max()) + 1
    logits = make_logits(rng, (B, S, N))
    sizes = make_pool_sizes(rng, "mixed", slots=g)
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    expected = ref.route_reference(logits, segs, K, sizes)
    assert_matches_reference(out, expected, segs, K)
    # explicit num_segments in standard mode
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, num_segments=g)
    assert_matches_reference(out, ref.route_reference(logits, segs, K, None), segs, K)


def test_pool_ties_go_to_lower_index():
    """Experts with identical logits in every token tie exactly in the document score;
    when such a tie straddles the pool boundary the lower index gets in."""
    rng = np.random.default_rng(5)
    n, k = 8, 2
    logits = make_logits(rng, (2, S, n), scale=0.5)
    logits[..., 6] += 4.0  # clear winner
    logits[..., 1] = logits[..., 5] = make_logits(rng, (2, S), scale=0.3) + 2.5  # twins, 2nd place
    segs = np.ones((2, S), np.int32)
    segs[1, S // 2:] = 2
    sizes = np.full((2, S + 1), 2, np.int32)
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=k, pool_sizes=jnp.asarray(sizes))
    expected = ref.route_reference(logits, segs, k, sizes)
    assert len(expected.doc_pools) == 3
    for key, pool in expected.doc_pools.items():
        assert pool == [1, 6], (key, pool)
    assert_matches_reference(out, expected, segs, k)
    assert not np.any(np.asarray(out.expert_ids) == 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_document_pool_one_sort_equals_double_argsort(seed):
    """document_pool (one sort of the values plus a threshold) picks exactly the experts
    of the two stable argsorts it replaced, on scores full of ties (values drawn from a
    few levels, whole rows of zeros) and pool sizes from 0 to past N."""
    rng = np.random.default_rng(seed)
    n = 9
    scores = rng.integers(0, 4, (3, 7, n)).astype(np.float32) / 4.0
    scores[0, 0] = 0.0
    scores[1, 2] = 0.5
    sizes = rng.integers(0, n + 3, (3, 7)).astype(np.int32)
    sizes[2] = np.arange(7)  # every size from 0 up
    order = np.argsort(-scores, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1, kind="stable")
    expected = rank < sizes[..., None]
    got = np.asarray(jax.jit(routing.document_pool)(jnp.asarray(scores), jnp.asarray(sizes)))
    np.testing.assert_array_equal(got, expected)


def test_document_piece_in_each_row_gets_its_own_pool():
    """A document cut by the row boundary: each row's piece is pooled on its own."""
    n, k, seq = 6, 1, 8
    logits = np.zeros((2, seq, n), np.float32)
    logits[0, :, 0] = 4.0
    logits[0, :, 1] = 3.0
    logits[1, :, 2] = 4.0
    logits[1, :, 3] = 3.0
    logits[1, 0, 0] = 5.0  # one token of row 1 prefers expert 0, outside row 1's pool
    segs = np.ones((2, seq), np.int32)
    sizes = np.full((2, seq + 1), 2, np.int32)
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=k, pool_sizes=jnp.asarray(sizes))
    expected = ref.route_reference(logits, segs, k, sizes)
    assert expected.doc_pools[(0, 1)] == [0, 1] and expected.doc_pools[(1, 1)] == [2, 3]
    assert_matches_reference(out, expected, segs, k)
    assert int(out.expert_ids[1, 0, 0]) == 2  # expert 0 is not in row 1's pool
    assert float(out.stats.document_count) == 2.0 and float(out.stats.pool_size_sum) == 4.0


def test_bfloat16_logits_routed_in_float32():
    rng = np.random.default_rng(9)
    segs = make_segments(rng, LAYOUTS)
    logits = jnp.asarray(make_logits(rng, (B, S, N))).astype(jnp.bfloat16)
    sizes = make_pool_sizes(rng, "mixed")
    out = route_jit(logits, jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    assert out.gates.dtype == jnp.float32 and out.probs.dtype == jnp.float32
    expected = ref.route_reference(np.asarray(logits.astype(jnp.float32)), segs, K, sizes)
    assert_matches_reference(out, expected, segs, K)


def test_stats_are_additive_and_give_reference_losses():
    """Stats of a batch = sum of the stats of its row blocks; global LB / z-loss from them."""
    rng = np.random.default_rng(21)
    segs = make_segments(rng, ("multi", "piece", "full", "multi"))
    logits = make_logits(rng, (B, S, N))
    sizes = make_pool_sizes(rng, "mixed")
    whole = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    half = B // 2
    parts = [route_jit(jnp.asarray(logits[sl]), jnp.asarray(segs[sl]), top_k=K,
                       pool_sizes=jnp.asarray(sizes[sl])).stats
             for sl in (slice(0, half), slice(half, B))]
    for name in routing.RoutingStats._fields:
        np.testing.assert_allclose(np.asarray(getattr(parts[0], name)) + np.asarray(getattr(parts[1], name)),
                                   np.asarray(getattr(whole.stats, name)), rtol=1e-5, err_msg=name)
    expected = ref.route_reference(logits, segs, K, sizes).stats
    lb = ref.load_balance_loss_reference(expected.expert_counts, expected.prob_sums,
                                         expected.token_count, N, K)
    np.testing.assert_allclose(float(losses.load_balance_loss(whole.stats, N, K)), lb, rtol=1e-5)
    np.testing.assert_allclose(float(losses.router_z_loss(whole.stats)),
                               ref.router_z_loss_reference(expected.router_z_sum, expected.token_count),
                               rtol=1e-5)
    # counts: every valid token makes exactly k_r assignments
    assert float(jnp.sum(whole.stats.expert_counts)) == K * float(np.sum(segs > 0))


# ----------------------------------------------------------------------------- shared experts


@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_add_shared_experts(n_shared):
    rng = np.random.default_rng(n_shared)
    segs = make_segments(rng, LAYOUTS)
    logits = make_logits(rng, (B, S, N))
    sizes = make_pool_sizes(rng, "mid")
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    ids, gates = routing.add_shared_experts(out.expert_ids, out.gates, N, n_shared)
    want_ids, want_gates = ref.add_shared_experts_reference(np.asarray(out.expert_ids),
                                                            np.asarray(out.gates), N, n_shared)
    assert ids.shape == (B, S, K + n_shared) and gates.shape == (B, S, K + n_shared)
    assert gates.dtype == out.gates.dtype
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_array_equal(np.asarray(gates), want_gates)  # shared weight exactly 1.0
    if n_shared:
        # routed part untouched; shared ids are the last n_s experts of E = N + n_s
        assert np.all(np.asarray(ids)[..., K:] >= N) and np.all(np.asarray(ids)[..., K:] < N + n_shared)
        np.testing.assert_array_equal(np.asarray(gates)[..., :K], np.asarray(out.gates))


def test_add_shared_experts_under_jit_and_other_ranks():
    ids = jnp.array([[0, 2], [1, 3]], jnp.int32)
    gates = jnp.array([[0.5, 0.25], [0.4, 0.1]], jnp.float32)
    got_ids, got_gates = jax.jit(routing.add_shared_experts, static_argnums=(2, 3))(ids, gates, 4, 1)
    np.testing.assert_array_equal(np.asarray(got_ids), [[0, 2, 4], [1, 3, 4]])
    np.testing.assert_array_equal(np.asarray(got_gates),
                                  np.array([[0.5, 0.25, 1.0], [0.4, 0.1, 1.0]], np.float32))


# ----------------------------------------------------------------------------- EOS segments


EOS = 7


def _random_tokens(rng, batch, seq, eos_rate=0.2):
    tokens = rng.integers(0, 6, size=(batch, seq))
    tokens[rng.random((batch, seq)) < eos_rate] = EOS
    return tokens.astype(np.int32)


def test_segments_starting_at_eos_examples():
    tokens = np.array([
        [3, 4, EOS, 5, 1, EOS, 2, 2],      # segment starts AT each EOS
        [EOS, 1, 2, EOS, EOS, 3, 4, 5],    # EOS at t=0 opens segment 1; back-to-back EOS
        [1, 2, 3, 4, 5, 1, 2, 3],          # no EOS: one segment
    ], np.int32)
    want = np.array([
        [1, 1, 2, 2, 2, 3, 3, 3],
        [1, 1, 1, 2, 3, 3, 3, 3],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ])
    np.testing.assert_array_equal(ref.eos_segments_reference(tokens, EOS), want)
    np.testing.assert_array_equal(np.asarray(routing.segments_starting_at_eos(jnp.asarray(tokens), EOS)), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segments_starting_at_eos_match_reference_with_right_padding(seed):
    rng = np.random.default_rng(seed)
    tokens = _random_tokens(rng, 4, 20)
    lengths = np.array([20, 13, 1, 0])
    valid = np.arange(20)[None, :] < lengths[:, None]
    tokens[~valid] = rng.choice([0, EOS], size=int((~valid).sum()))  # padding may hold EOS
    got = jax.jit(routing.segments_starting_at_eos, static_argnums=1)(jnp.asarray(tokens), EOS, jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(got), ref.eos_segments_reference(tokens, EOS, valid))
    got_unmasked = routing.segments_starting_at_eos(jnp.asarray(tokens), EOS)
    np.testing.assert_array_equal(np.asarray(got_unmasked), ref.eos_segments_reference(tokens, EOS))


def test_eos_segments_feed_route():
    rng = np.random.default_rng(4)
    tokens = _random_tokens(rng, B, S)
    valid = np.arange(S)[None, :] < np.array([S, S - 4, S, 5])[:, None]
    segs = np.asarray(routing.segments_starting_at_eos(jnp.asarray(tokens), EOS, jnp.asarray(valid)))
    logits = make_logits(rng, (B, S, N))
    sizes = make_pool_sizes(rng, "mixed")
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=jnp.asarray(sizes))
    assert_matches_reference(out, ref.route_reference(logits, segs, K, sizes), segs, K)


def test_segments_starting_at_eos_left_padding_numbered_from_one():
    tokens = np.array([[EOS, EOS, 1, 2, EOS, 3], [0, 0, EOS, 2, EOS, 3]], np.int32)
    valid = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
    want = ref.eos_segments_reference(tokens, EOS, valid)
    np.testing.assert_array_equal(want, [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]])
    got = routing.segments_starting_at_eos(jnp.asarray(tokens), EOS, jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- pool size modes


def test_pool_sizes_for_mode():
    key = jax.random.key(0)
    assert routing.pool_sizes_for_mode("none", key, 3, 5, 32, 8, 128) is None
    assert routing.pool_sizes_for_mode("none", None, 3, 5, 32, 8, 128) is None
    fixed = routing.pool_sizes_for_mode("fixed", None, 3, 5, 32, 8, 128)
    assert fixed.shape == (3, 5) and fixed.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(fixed), np.full((3, 5), 32))
    rand = routing.pool_sizes_for_mode("random", key, 64, 33, 32, 8, 128)
    assert rand.shape == (64, 33) and rand.dtype == jnp.int32
    rand = np.asarray(rand)
    assert rand.min() >= 8 and rand.max() <= 128
    # both ends of UniformInt[8, 128] are reachable (64*33 draws over 121 values)
    assert rand.min() <= 9 and rand.max() >= 127
    np.testing.assert_array_equal(
        rand, np.asarray(routing.pool_sizes_for_mode("random", key, 64, 33, 32, 8, 128)))
    # inclusive bounds on a tiny range
    tiny = np.asarray(routing.pool_sizes_for_mode("random", jax.random.key(1), 50, 20, 0, 3, 4))
    assert set(np.unique(tiny).tolist()) == set(ref.uniform_int_reference(3, 4))
    with pytest.raises(ValueError):
        routing.pool_sizes_for_mode("random", None, 3, 5, 32, 8, 128)
    with pytest.raises(ValueError):
        routing.pool_sizes_for_mode("bogus", key, 3, 5, 32, 8, 128)


def test_fixed_pool_mode_routes_like_reference():
    rng = np.random.default_rng(31)
    segs = make_segments(rng, LAYOUTS)
    logits = make_logits(rng, (B, S, N))
    sizes = routing.pool_sizes_for_mode("fixed", None, B, G, 5, K + 1, N)
    out = route_jit(jnp.asarray(logits), jnp.asarray(segs), top_k=K, pool_sizes=sizes)
    assert_matches_reference(out, ref.route_reference(logits, segs, K, np.asarray(sizes)), segs, K)
    assert float(out.stats.pool_size_sum) == 5 * float(out.stats.document_count)
