"""The dropless MoE compute (kernels.reference) and one MoE layer (moe.moe_layer)
against a per-token dense loop written here, forward and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import moe, routing
from emo_jax.kernels import reference

HI = jax.lax.Precision.HIGHEST
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ independent references


def swiglu_one(x, wg, wu, wd):
    """One expert on one token: W_down(silu(W_gate x) * W_up x). x: [D]."""
    g = jnp.dot(x, wg, precision=HI)
    u = jnp.dot(x, wu, precision=HI)
    return jnp.dot(g * jax.nn.sigmoid(g) * u, wd, precision=HI)


def loop_ffn(x, ids, gates, valid, wg, wu, wd):
    """Per-token Python loop: y_t = sum_j gates[t, j] * E_{ids[t, j]}(x_t); padding -> 0.

    ids and valid are concrete numpy arrays (the discrete choices)."""
    rows = []
    for t in range(x.shape[0]):
        y = jnp.zeros((x.shape[1],), jnp.float32)
        if valid[t]:
            for j in range(ids.shape[1]):
                e = int(ids[t, j])
                y = y + gates[t, j] * swiglu_one(x[t], wg[e], wu[e], wd[e])
        rows.append(y)
    return jnp.stack(rows)


def gathered_ffn(x, ids, gates, valid, wg, wu, wd):
    """The same per-token sum, vectorised: every token gathers its own K experts' weights
    (no sorting, no grouped matmul). ids, valid: numpy."""
    ids = jnp.asarray(ids)
    g = jnp.einsum("td,tkdh->tkh", x, wg[ids], precision=HI)
    u = jnp.einsum("td,tkdh->tkh", x, wu[ids], precision=HI)
    out = jnp.einsum("tkh,tkhd->tkd", g * jax.nn.sigmoid(g) * u, wd[ids], precision=HI)
    y = jnp.einsum("tkd,tk->td", out, gates, precision=HI)
    return jnp.where(jnp.asarray(valid)[:, None], y, 0.0)


def np_routing_choices(x, seg, pool_sizes, wr, k_r):
    """Discrete routing decisions in float64 numpy: per-token pool mask [B,S,N] and top-k ids."""
    x64, wr64 = np.asarray(x, np.float64), np.asarray(wr, np.float64)
    z = x64 @ wr64
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    b_, s_, n = z.shape
    mask = np.ones((b_, s_, n), bool)
    if pool_sizes is not None:
        for b in range(b_):
            for s in set(seg[b].tolist()) - {0}:
                where = seg[b] == s
                score = p[b, where].mean(0)
                order = np.argsort(-score, kind="stable")
                keep = np.zeros(n, bool)
                keep[order[:pool_sizes[b, s]]] = True
                mask[b, where] = keep
    q = np.where(mask, z, -np.inf)
    q = np.exp(q - q.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    ids = np.argsort(-q, axis=-1, kind="stable")[..., :k_r]
    return mask, ids


def loop_layer(x, seg, mask, ids, wr, wg, wu, wd, n_shared, ws=None):
    """Reference MoE layer given the discrete choices: gates = pool-renormalised softmax
    of the router logits at the chosen experts (not renormalised over the top-k), shared
    experts with gate 1 (or, given their router ws [D, n_s], the softmax of its logits),
    padding output 0. Differentiable in x and all weights."""
    b_, s_, d = x.shape
    n = wr.shape[1]
    z = jnp.einsum("bsd,dn->bsn", x, wr, precision=HI)
    q = jax.nn.softmax(jnp.where(mask, z, -jnp.inf), axis=-1)
    gates = jnp.take_along_axis(q, jnp.asarray(ids), axis=-1)
    shared = np.broadcast_to(np.arange(n, n + n_shared), (b_, s_, n_shared))
    all_ids = np.concatenate([ids, shared], -1)
    shared_gates = (jnp.ones((b_, s_, n_shared)) if ws is None
                    else jax.nn.softmax(jnp.einsum("bsd,dn->bsn", x, ws, precision=HI), axis=-1))
    all_gates = jnp.concatenate([gates, shared_gates], -1)
    y = gathered_ffn(x.reshape(-1, d), all_ids.reshape(b_ * s_, -1), all_gates.reshape(b_ * s_, -1),
                 (seg > 0).reshape(-1), wg, wu, wd)
    return y.reshape(b_, s_, d)


def weights(rng, e, d, h, n_routed, scale=0.5):
    f = lambda *s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
    return f(d, n_routed), f(e, d, h), f(e, d, h), f(e, h, d)


def assert_tree_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


# ---------------------------------------------------------------------------- moe_ffn


T, D, H, E, K = 10, 8, 6, 5, 3
UNUSED = 3  # no valid token routes to this expert


@pytest.fixture(scope="module")
def ffn_inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    ids = np.stack([rng.choice([0, 1, 2, 4], size=K, replace=False) for _ in range(T)]).astype(np.int32)
    valid = np.ones(T, bool)
    valid[[4, 9]] = False
    ids[9] = [UNUSED, 0, 1]  # a padding token pointing at the unused expert
    gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(T, K)), jnp.float32)
    _, wg, wu, wd = weights(rng, E, D, H, 1)
    cot = jnp.asarray(rng.normal(size=(T, D)), jnp.float32)
    return x, ids, gates, valid, wg, wu, wd, cot


def test_moe_ffn_forward_matches_loop(ffn_inputs):
    x, ids, gates, valid, wg, wu, wd, _ = ffn_inputs
    y = jax.jit(reference.moe_ffn)(x, jnp.asarray(ids), gates, jnp.asarray(valid), wg, wu, wd)
    y_ref = loop_ffn(x, ids, gates, valid, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    # the vectorised reference used below agrees with the loop
    y_gat = gathered_ffn(x, ids, gates, valid, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y_gat), np.asarray(y_ref), **TOL)
    assert np.all(np.asarray(y)[~valid] == 0.0)
    assert np.abs(np.asarray(y)[valid]).min() > 0  # non-trivial outputs


def test_moe_ffn_gradients_match_loop(ffn_inputs):
    x, ids, gates, valid, wg, wu, wd, cot = ffn_inputs

    def loss_impl(x, gates, wg, wu, wd):
        return jnp.sum(reference.moe_ffn(x, jnp.asarray(ids), gates, jnp.asarray(valid), wg, wu, wd) * cot)

    def loss_ref(x, gates, wg, wu, wd):
        return jnp.sum(gathered_ffn(x, ids, gates, valid, wg, wu, wd) * cot)

    args = (x, gates, wg, wu, wd)
    g_impl = jax.jit(jax.grad(loss_impl, argnums=range(5)))(*args)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=range(5)))(*args)
    assert_tree_close(g_impl, g_ref)
    gx, ggates, gwg, gwu, gwd = map(np.asarray, g_impl)
    for g in (gwg, gwu, gwd):  # the expert no valid token uses: exactly zero
        assert np.all(g[UNUSED] == 0.0)
        assert np.abs(g[[0, 1, 2, 4]]).sum() > 0
    assert np.all(gx[~valid] == 0.0) and np.all(ggates[~valid] == 0.0)


def test_moe_ffn_nan_in_padding_does_not_leak(ffn_inputs):
    x, ids, gates, valid, wg, wu, wd, cot = ffn_inputs
    x_nan = x.at[np.flatnonzero(~valid)].set(jnp.nan)
    gates_nan = gates.at[np.flatnonzero(~valid)].set(jnp.nan)

    def loss(x, gates, wg, wu, wd):
        y = reference.moe_ffn(x, jnp.asarray(ids), gates, jnp.asarray(valid), wg, wu, wd)
        return jnp.sum(jnp.where(jnp.asarray(valid)[:, None], y, 0.0) * cot), y

    f = jax.jit(jax.value_and_grad(loss, argnums=(2, 3, 4), has_aux=True))
    (_, y_clean), g_clean = f(x, gates, wg, wu, wd)
    (_, y_nan), g_nan = f(x_nan, gates, wg, wu, wd)
    y_clean, y_nan = np.asarray(y_clean), np.asarray(y_nan)
    assert np.all(np.isfinite(y_nan[valid]))
    np.testing.assert_array_equal(y_nan[valid], y_clean[valid])
    assert np.all(y_nan[~valid] == 0.0)  # padding output is 0, not NaN
    for a, b in zip(g_nan, g_clean):  # expert-weight gradients: finite and unchanged
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # NaN gates on padding tokens do not leak either (shared/routed copies are masked).
    y_g = np.asarray(jax.jit(reference.moe_ffn)(x, jnp.asarray(ids), gates_nan, jnp.asarray(valid), wg, wu, wd))
    np.testing.assert_array_equal(y_g[valid], y_clean[valid])


# ---------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("m, num_keys", [(1, 1), (37, 3), (4096, 65), (20000, 129)])
def test_packed_key_sort_is_the_stable_argsort(m, num_keys):
    """The expert sort packs key and index in one int32: the same order as a stable
    argsort, many equal keys included (and the argsort fallback when it cannot pack)."""
    keys = jnp.asarray(np.random.default_rng(m).integers(0, num_keys, m), jnp.int32)
    want = np.argsort(np.asarray(keys), kind="stable")
    np.testing.assert_array_equal(np.asarray(jax.jit(reference.stable_order_of_small_keys, static_argnums=1)(
        keys, num_keys)), want)
    # num_keys * M past int32: the argsort fallback, same order.
    np.testing.assert_array_equal(np.asarray(reference.stable_order_of_small_keys(keys, 2**31 // m + 1)), want)


@pytest.mark.parametrize("backend", ["reference", "capacity"])
def test_expert_ids_outside_the_experts_are_in_no_group_and_touch_no_other_token(backend):
    """An id outside [0, E) (huge, so key * M would wrap int32 in the packed sort, or
    negative) makes that copy contribute 0; every other copy is computed as usual."""
    from emo_jax import kernels
    rng = np.random.default_rng(11)
    t, k, e, d, h = 12, 2, 3, 4, 5
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    gates = jnp.asarray(rng.uniform(0.1, 1, (t, k)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((e, d, h), (e, d, h), (e, h, d))]
    valid = jnp.ones(t, bool)
    bad = ids.copy()
    bad[5, 0], bad[6, 1] = 2**30, -3
    ffn = kernels.backend_for(backend).moe_ffn
    got = np.asarray(jax.jit(ffn)(x, jnp.asarray(bad), gates, valid, *w))
    zeroed = gates.at[5, 0].set(0.0).at[6, 1].set(0.0)  # the same copies contributing nothing
    want = np.asarray(jax.jit(ffn)(x, jnp.asarray(ids), zeroed, valid, *w))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    order, sizes, valid_sorted = reference.sort_copies(jnp.asarray(bad), valid, e)
    assert sorted(np.asarray(order).tolist()) == list(range(t * k)), "order stays a permutation"
    assert int(np.asarray(sizes).sum()) == t * k - 2 and int(np.asarray(valid_sorted).sum()) == t * k - 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dispatch_group_sizes_and_sort_invariants(seed):
    rng = np.random.default_rng(seed)
    t, k, e, d = 13, 3, 6, 4
    ids = np.stack([rng.choice(e - 1, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    valid = rng.random(t) < 0.7
    valid[0] = True
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    out = jax.jit(reference.dispatch, static_argnums=3)(x, jnp.asarray(ids), jnp.asarray(valid), e)
    order, sizes = np.asarray(out.order), np.asarray(out.group_sizes)
    valid_sorted, x_sorted = np.asarray(out.valid_sorted), np.asarray(out.x_sorted)
    m = t * k
    # group sizes: per-expert count of valid copies; expert e-1 gets none.
    expected = np.bincount(ids[valid].reshape(-1), minlength=e)
    np.testing.assert_array_equal(sizes, expected)
    assert sizes[e - 1] == 0 and sizes.sum() == valid.sum() * k
    # order is a permutation of the copies
    np.testing.assert_array_equal(np.sort(order), np.arange(m))
    n_valid = sizes.sum()
    # valid copies first, then the invalid ones
    assert valid_sorted[:n_valid].all() and not valid_sorted[n_valid:].any()
    np.testing.assert_array_equal(valid_sorted, np.repeat(valid, k)[order])
    # sorted rows are grouped by expert in nondecreasing order, contiguous per group_sizes
    flat = ids.reshape(-1)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for j in range(e):
        np.testing.assert_array_equal(flat[order[bounds[j]:bounds[j + 1]]], j)
    # stable: inside a group, copies keep their original order
    for j in range(e):
        seg = order[bounds[j]:bounds[j + 1]]
        assert np.all(np.diff(seg) > 0)
    # rows are the token of each copy
    np.testing.assert_array_equal(x_sorted, np.asarray(x)[order // k])


@pytest.mark.parametrize("seed", [0, 1])
def test_combine_equals_the_scatter_unsort_forward_and_gradients(seed):
    """`combine` unsorts with two row gathers (`unsort_rows`, a custom VJP); the result and
    the gradients of the outputs and gates are those of autodiff through the plain scatter,
    with NaN in the invalid rows kept out of both."""
    rng = np.random.default_rng(seed)
    t, k, d = 7, 3, 5
    m = t * k
    order = jnp.asarray(rng.permutation(m), jnp.int32)
    valid_sorted = jnp.asarray(np.arange(m) < m - 4)
    y_sorted = jnp.asarray(rng.normal(size=(m, d)), jnp.float32).at[m - 4:].set(jnp.nan)
    gates = jnp.asarray(rng.random((t, k)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def scatter_combine(y_sorted, gates):
        y = jnp.zeros_like(y_sorted).at[order].set(jnp.where(valid_sorted[:, None], y_sorted, 0))
        return jnp.einsum("tkd,tk->td", y.reshape(t, k, d), gates)

    def loss(fn):
        return lambda y_sorted, gates: jnp.sum(fn(y_sorted, gates) * cot)

    gathered = functools.partial(reference.combine, order=order, valid_sorted=valid_sorted)
    np.testing.assert_allclose(gathered(y_sorted, gates=gates), scatter_combine(y_sorted, gates), rtol=1e-6)
    got = jax.jit(jax.grad(loss(lambda y, g: gathered(y, gates=g)), argnums=(0, 1)))(y_sorted, gates)
    want = jax.grad(loss(scatter_combine), argnums=(0, 1))(y_sorted, gates)
    for a, b in zip(got, want):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(reference.inverse_permutation(order)[order], np.arange(m))


# ---------------------------------------------------------------------------- moe_layer

LB, LS, LD, LH = 2, 8, 8, 6


def layer_case(n_shared, pooled, seed=0):
    rng = np.random.default_rng(seed)
    n_routed = 5
    e = n_routed + n_shared
    k_r = 2
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 3, 3, 0, 0]], np.int32)
    x = rng.normal(size=(LB, LS, LD)).astype(np.float32)
    x[..., 0] = np.abs(x[..., 0]) + 1.0  # positive feature -> a starved expert below
    wr, wg, wu, wd = weights(rng, e, LD, LH, n_routed)
    wr = wr.at[0, 4].set(-60.0).at[1:, 4].set(0.01)  # expert 4 never wins top-k
    pool_sizes = None
    if pooled:
        pool_sizes = np.full((LB, LS + 1), n_routed, np.int32)
        pool_sizes[:, 1:4] = rng.integers(k_r, n_routed, size=(LB, 3))
        pool_sizes[0, 1] = k_r  # the tightest pool
    cot = jnp.asarray(rng.normal(size=(LB, LS, LD)), jnp.float32)
    return jnp.asarray(x), seg, pool_sizes, wr, wg, wu, wd, cot, k_r


@pytest.mark.parametrize("n_shared,pooled", [(1, True), (0, True), (2, False)])
def test_moe_layer_forward_and_grads_match_loop(n_shared, pooled):
    x, seg, pool_sizes, wr, wg, wu, wd, cot, k_r = layer_case(n_shared, pooled)
    mask, ids = np_routing_choices(x, seg, pool_sizes, wr, k_r)
    assert not (ids == 4).any()
    ps = None if pool_sizes is None else jnp.asarray(pool_sizes)
    # Two or more shared experts have their own router (softmax weights, as the official EMO).
    ws = jnp.asarray(np.random.default_rng(7).normal(size=(LD, max(n_shared, 1))), jnp.float32)
    use_ws = n_shared >= 2

    def impl(x, wr, wg, wu, wd, ws):
        y, _ = moe.moe_layer(x, jnp.asarray(seg), ps, wr, wg, wu, wd, routed_top_k=k_r, n_shared=n_shared,
                             w_shared_router=ws if use_ws else None)
        return jnp.sum(y * cot), y

    def ref(x, wr, wg, wu, wd, ws):
        y = loop_layer(x, seg, mask, ids, wr, wg, wu, wd, n_shared, ws if use_ws else None)
        return jnp.sum(y * cot), y

    args = (x, wr, wg, wu, wd, ws)
    (_, y_impl), g_impl = jax.jit(jax.value_and_grad(impl, argnums=range(6), has_aux=True))(*args)
    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(ref, argnums=range(6), has_aux=True))(*args)
    np.testing.assert_allclose(np.asarray(y_impl), np.asarray(y_ref), **TOL)
    assert np.all(np.asarray(y_impl)[seg == 0] == 0.0)
    assert_tree_close(g_impl, g_ref)
    gx, gwr, gwg, gwu, gwd, gws = map(np.asarray, g_impl)
    assert (np.abs(gws).sum() > 0) == use_ws
    for g in (gwg, gwu, gwd):
        assert np.all(g[4] == 0.0)  # starved expert: exactly zero gradient
        assert np.all(np.abs(g[[0, 1, 2, 3]]).sum(axis=(1, 2)) > 0)
    assert np.abs(gwr).sum() > 0
    assert np.all(gx[seg == 0] == 0.0)
    if pooled:  # the pool really restricted some token (else the test is not about pools)
        assert (~mask[seg > 0]).any()


def test_moe_layer_nan_at_padding_does_not_leak():
    x, seg, pool_sizes, wr, wg, wu, wd, cot, k_r = layer_case(1, True, seed=3)
    x_nan = x.at[jnp.asarray(seg == 0)].set(jnp.nan)
    ps = jnp.asarray(pool_sizes)

    @jax.jit
    def run(x, wg, wu, wd):
        def loss(wg, wu, wd):
            y, stats = moe.moe_layer(x, jnp.asarray(seg), ps, wr, wg, wu, wd, routed_top_k=k_r, n_shared=1)
            return jnp.sum(jnp.where(jnp.asarray(seg > 0)[..., None], y, 0.0) * cot), (y, stats)
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(wg, wu, wd)

    (_, (y0, st0)), g0 = run(x, wg, wu, wd)
    (_, (y1, st1)), g1 = run(x_nan, wg, wu, wd)
    valid = seg > 0
    y0, y1 = np.asarray(y0), np.asarray(y1)
    assert np.all(np.isfinite(y1[valid]))
    np.testing.assert_array_equal(y1[valid], y0[valid])
    assert np.all(y1[~valid] == 0.0)
    for a, b in zip(g1, g0):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # counts and probability sums only see valid tokens
    np.testing.assert_array_equal(np.asarray(st1.expert_counts), np.asarray(st0.expert_counts))
    np.testing.assert_array_equal(np.asarray(st1.prob_sums), np.asarray(st0.prob_sums))


def test_routing_stats_router_z_ignores_nan_padding():
    seg = jnp.array([[1, 1, 2, 0], [1, 1, 1, 0]], jnp.int32)
    ids = jnp.zeros((2, 4, 2), jnp.int32).at[..., 1].set(1)
    probs = jnp.full((2, 4, 3), 1.0 / 3)
    lse = jnp.array([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    lse_nan = lse.at[:, 3].set(jnp.nan)  # NaN only at the padding tokens
    args = (probs, lse_nan, seg > 0, None, seg, 5)
    st = routing.routing_stats(ids, *args)  # eager, op by op
    assert float(st.router_z_sum) == pytest.approx(1 + 4 + 9 + 3)


def test_public_boundaries_check_shapes_and_dtypes():
    """chex assertions at routing.route / moe.moe_layer: a wrong shape or dtype fails at trace
    time naming the mismatch, instead of broadcasting into wrong results."""
    x, seg, _, wr, wg, wu, wd, _, k_r = layer_case(2, False)
    seg = jnp.asarray(seg)
    ws = jnp.zeros((LD, 2), jnp.float32)
    call = functools.partial(moe.moe_layer, routed_top_k=k_r, n_shared=2)
    y, _ = jax.eval_shape(lambda: call(x, seg, None, wr, wg, wu, wd, w_shared_router=ws))
    assert y.shape == x.shape
    with pytest.raises(AssertionError):  # segment ids of another shape
        jax.eval_shape(lambda: call(x, seg[:, :-1], None, wr, wg, wu, wd, w_shared_router=ws))
    with pytest.raises(AssertionError):  # float segment ids
        jax.eval_shape(lambda: call(x, seg.astype(jnp.float32), None, wr, wg, wu, wd, w_shared_router=ws))
    with pytest.raises(AssertionError):  # shared router of the wrong width
        jax.eval_shape(lambda: call(x, seg, None, wr, wg, wu, wd, w_shared_router=ws[:, :1]))
    with pytest.raises(AssertionError):  # w_down not [E, H, D]
        jax.eval_shape(lambda: call(x, seg, None, wr, wg, wu, jnp.swapaxes(wd, 1, 2), w_shared_router=ws))
    with pytest.raises(AssertionError):  # router columns + shared != experts
        jax.eval_shape(lambda: call(x, seg, None, wr[:, :-1], wg, wu, wd, w_shared_router=ws))
    with pytest.raises(ValueError, match="need their router"):
        jax.eval_shape(lambda: call(x, seg, None, wr, wg, wu, wd))
    with pytest.raises(AssertionError):  # pool sizes for another batch
        routing.route(jnp.zeros((LB, LS, 5)), seg, 2, jnp.full((LB + 1, LS + 1), 3, jnp.int32))


def _stacked_shared_layer(x, segment_ids, pool_sizes, wr, wg, wu, wd, n_shared, ws, backend):
    """The formulation before issue 16: the shared experts appended to every token's
    expert list (`routing.add_shared_experts`) and run through dispatch with the
    routed ones, over the whole [E, ...] stack."""
    b_, s_, d = x.shape
    r = routing.route(moe.router_logits(x, wr), segment_ids, 2, pool_sizes, num_segments=s_ + 1)
    ids, gates = routing.add_shared_experts(r.expert_ids, r.gates, wr.shape[1], n_shared,
                                            moe.shared_gates(x, ws, n_shared))
    k = ids.shape[-1]
    y = backend.moe_ffn(x.reshape(-1, d), ids.reshape(-1, k), gates.reshape(-1, k),
                        (segment_ids > 0).reshape(-1), wg, wu, wd)
    return y.reshape(x.shape)


@pytest.mark.parametrize("backend", ["reference", "capacity"])
@pytest.mark.parametrize("n_shared", [1, 2])
def test_dense_shared_experts_equal_the_stacked_formulation(n_shared, backend):
    """Shared experts as a dense SwiGLU outside dispatch (issue 16) give the outputs and
    gradients of the old formulation (shared copies through dispatch with gate 1, or
    with their router's softmax weights for n_s >= 2), padding tokens included."""
    from emo_jax import kernels

    rng = np.random.default_rng(7)
    b_, s_, d, h, n_r = 2, 12, 8, 6, 5
    e = n_r + n_shared
    x = jnp.asarray(rng.normal(size=(b_, s_, d)), jnp.float32)
    seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [0] * 3 + [1] * 9], jnp.int32)
    pools = jnp.full((b_, s_ + 1), 3, jnp.int32)
    wr, wg, wu, wd = weights(rng, e, d, h, n_r)
    ws = jnp.asarray(rng.normal(size=(d, n_shared)), jnp.float32) if n_shared >= 2 else None
    be = kernels.backend_for(backend)
    extra = {} if ws is None else {"w_shared_router": ws}

    def new(x, wg, wu, wd):
        return moe.moe_layer(x, seg, pools, wr, wg, wu, wd, routed_top_k=2, n_shared=n_shared,
                             ffn=be.moe_ffn, **extra)[0]

    def old(x, wg, wu, wd):
        return _stacked_shared_layer(x, seg, pools, wr, wg, wu, wd, n_shared, ws, be)

    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    for f in (new, old):
        assert f(x, wg, wu, wd).shape == x.shape
    y_new, y_old = jax.jit(new)(x, wg, wu, wd), jax.jit(old)(x, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y_new), np.asarray(y_old), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(y_new)[np.asarray(seg) == 0]), "padding tokens give 0"
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
    for g_new, g_old, name in zip(grad(new), grad(old), ("x", "w_gate", "w_up", "w_down")):
        np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_old), rtol=1e-5, atol=1e-5, err_msg=name)
