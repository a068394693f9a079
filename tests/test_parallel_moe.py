"""Expert-parallel MoE (shard_map + all_to_all) against the single-device `moe.moe_layer`.

Every check compares forward outputs, routing statistics and gradients with respect to
x, the router and the three expert weights, in float32, on the 8 emulated CPU devices.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import compat, routing
from emo_jax.compat import use_mesh
from emo_jax.config import MeshConfig
from emo_jax.moe import moe_layer
from emo_jax.parallel import build_mesh, make_expert_parallel_moe
from emo_jax.parallel.expert_parallel import local_group_keys

MESHES = [(8, 1, 1), (2, 1, 4), (1, 2, 4), (1, 1, 8), (2, 2, 2)]
TRANSPORTS = ["all_to_all", "emulated_ragged"]
RTOL = 1e-5

B, S, D, H, E = 8, 16, 16, 8, 8


def _mesh(shape):
    return build_mesh(MeshConfig(data=shape[0], fsdp=shape[1], expert=shape[2]))


def _segments() -> np.ndarray:
    """Rows with 1-4 documents and padding (segment 0) in different places."""
    rows = [
        [1] * 6 + [2] * 7 + [0] * 3,
        [1] * 16,
        [1] * 3 + [2] * 3 + [3] * 3 + [4] * 7,
        [1] * 10 + [0] * 6,
        [0] * 2 + [1] * 14,  # padding at the start
        [1] * 4 + [2] * 12,
        [1] * 8 + [2] * 5 + [0] * 3,
        [1] * 1 + [2] * 15,  # a one-token document
    ]
    return np.asarray(rows, np.int32)


def _inputs(n_shared: int, seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(k[0], (B, S, D))
    w_router = jax.random.normal(k[1], (D, E - n_shared))
    w_gate = jax.random.normal(k[2], (E, D, H)) * 0.3
    w_up = jax.random.normal(k[3], (E, D, H)) * 0.3
    w_down = jax.random.normal(k[4], (E, H, D)) * 0.3
    return x, w_router, w_gate, w_up, w_down, k[5]


def _loss_and_grads(fn, segment_ids, pool_sizes, routed_top_k, n_shared):
    """jit(value_and_grad) of a scalar that depends on y and on every differentiable stat."""

    def loss(x, wr, wg, wu, wd):
        y, st = fn(x, segment_ids, pool_sizes, wr, wg, wu, wd, routed_top_k=routed_top_k, n_shared=n_shared)
        n = st.prob_sums.shape[-1]
        scalar = (jnp.sum(y * jnp.sin(y)) + jnp.sum(st.prob_sums * jnp.arange(1, n + 1))
                  + 0.1 * jnp.sum(st.router_z_sum))
        return scalar, (y, st)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _assert_close(actual, expected, name, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=name)


def _assert_same(out, ref):
    (loss, (y, st)), grads = out
    (ref_loss, (ref_y, ref_st)), ref_grads = ref
    _assert_close(loss, ref_loss, "loss")
    _assert_close(y, ref_y, "y")
    np.testing.assert_array_equal(np.asarray(st.expert_counts), np.asarray(ref_st.expert_counts))
    np.testing.assert_array_equal(np.asarray(st.token_count), np.asarray(ref_st.token_count))
    np.testing.assert_array_equal(np.asarray(st.document_count), np.asarray(ref_st.document_count))
    np.testing.assert_array_equal(np.asarray(st.pool_size_sum), np.asarray(ref_st.pool_size_sum))
    _assert_close(st.prob_sums, ref_st.prob_sums, "prob_sums")
    _assert_close(st.router_z_sum, ref_st.router_z_sum, "router_z_sum")
    for name, g, rg in zip(("d_x", "d_router", "d_w_gate", "d_w_up", "d_w_down"), grads, ref_grads):
        _assert_close(g, rg, name)


class Case:
    """One routing setup with its single-device reference (computed once per module)."""

    def __init__(self, n_shared, routed_top_k, pooled, seed=0):
        x, wr, wg, wu, wd, key = _inputs(n_shared, seed)
        self.args = (x, wr, wg, wu, wd)
        self.segment_ids = jnp.asarray(_segments())
        self.pool_sizes = (routing.draw_pool_sizes(key, (B, S + 1), routed_top_k, E) if pooled else None)
        self.k, self.ns = routed_top_k, n_shared
        self.ref = self.run(moe_layer)

    def run(self, fn, mesh=None):
        f = _loss_and_grads(fn, self.segment_ids, self.pool_sizes, self.k, self.ns)
        if mesh is None:
            return f(*self.args)
        with use_mesh(mesh):
            return f(*self.args)


@pytest.fixture(scope="module")
def emo_case():
    return Case(n_shared=1, routed_top_k=3, pooled=True)


@pytest.fixture(scope="module")
def standard_case():
    return Case(n_shared=1, routed_top_k=3, pooled=False, seed=1)



def _case_id(v) -> str:
    """Test id: a mesh shape as 2x1x4, a transport as its name."""
    return "x".join(map(str, v)) if isinstance(v, tuple) else v

@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_expert_parallel_matches_single_device(emo_case, shape, transport):
    mesh = _mesh(shape)
    out = emo_case.run(make_expert_parallel_moe(mesh, transport), mesh)
    _assert_same(out, emo_case.ref)
    # Padding tokens (segment 0) produce exactly zero output.
    y = np.asarray(out[0][1][0])
    assert np.all(y[_segments() == 0] == 0.0)
    assert np.all(np.abs(y[_segments() > 0]).sum(-1) > 0)


@pytest.mark.parametrize("shape, transport", [((2, 1, 4), "all_to_all"), ((1, 1, 8), "emulated_ragged"),
                                              ((2, 2, 2), "all_to_all")],
                         ids=_case_id)
def test_standard_moe_without_pool(standard_case, shape, transport):
    mesh = _mesh(shape)
    out = standard_case.run(make_expert_parallel_moe(mesh, transport), mesh)
    _assert_same(out, standard_case.ref)
    # No pool: the pool-size statistic reports n_routed for every document.
    st = out[0][1][1]
    assert float(st.pool_size_sum) == float(st.document_count) * (E - 1)


# --- worst-case imbalance --------------------------------------------------------------

HOT = 2  # experts 0 and 1 take every routed copy


class HotCase(Case):
    """No shared expert, k_r = 2, pool size = k_r: every token of every shard goes to
    experts 0 and 1, which live on one device when the expert axis has 4 peers (E_l = 2),
    so that device receives every copy of every peer: the dense buffer is full."""

    def __init__(self):
        x, wr, wg, wu, wd, _ = _inputs(0, seed=2)
        x = jnp.abs(x) + 0.5  # positive features ...
        wr = 0.1 * wr
        wr = wr.at[:, :HOT].set(jnp.abs(wr[:, :HOT]) + 2.0)  # ... so experts 0, 1 win for every token
        self.args = (x, wr, wg, wu, wd)
        self.segment_ids = jnp.asarray(_segments())
        self.pool_sizes = jnp.full((B, S + 1), HOT, jnp.int32)
        self.k, self.ns = HOT, 0
        self.ref = self.run(moe_layer)


@pytest.fixture(scope="module")
def hot_case():
    return HotCase()


def test_hot_case_is_really_imbalanced(hot_case):
    st = hot_case.ref[0][1][1]
    counts = np.asarray(st.expert_counts)
    tokens = int((_segments() > 0).sum())
    np.testing.assert_array_equal(counts, [tokens, tokens] + [0] * (E - HOT))


@pytest.mark.parametrize("shape, transport", [((2, 1, 4), "all_to_all"), ((2, 1, 4), "emulated_ragged"),
                                              ((1, 1, 8), "all_to_all")],
                         ids=_case_id)
def test_worst_case_imbalance_is_dropless_and_exact(hot_case, shape, transport):
    mesh = _mesh(shape)
    out = hot_case.run(make_expert_parallel_moe(mesh, transport), mesh)
    _assert_same(out, hot_case.ref)
    (_, (y, _)), (_, _, d_gate, d_up, d_down) = out
    # Every real token got both expert outputs (dropless): compare with a direct computation.
    x, wr, wg, wu, wd = hot_case.args
    q = jax.nn.softmax(jnp.einsum("bsd,dn->bsn", x, wr[:, :HOT]), axis=-1)  # pool = {0, 1}

    def expert(i, v):
        return (jax.nn.silu(v @ wg[i]) * (v @ wu[i])) @ wd[i]

    direct = q[..., 0:1] * expert(0, x) + q[..., 1:2] * expert(1, x)
    direct = jnp.where((hot_case.segment_ids > 0)[..., None], direct, 0.0)
    _assert_close(y, direct, "y vs direct", rtol=1e-4)
    # Experts that receive no token get exactly zero weight gradients.
    for g in (d_gate, d_up, d_down):
        g = np.asarray(g)
        assert np.all(g[HOT:] == 0.0)
        assert np.all(np.abs(g[:HOT]).reshape(HOT, -1).sum(-1) > 0)


# --- local statistics -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 1, 4), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_local_stats_are_per_shard(emo_case, shape):
    mesh = _mesh(shape)
    c = emo_case
    local_fn = make_expert_parallel_moe(mesh, "all_to_all", stats="local")
    fwd = jax.jit(functools.partial(local_fn, routed_top_k=c.k, n_shared=c.ns))
    with use_mesh(mesh):
        y, st = fwd(c.args[0], c.segment_ids, c.pool_sizes, *c.args[1:])
    n_shards = 8
    assert st.expert_counts.shape == (n_shards, E - 1)
    assert st.token_count.shape == (n_shards,)
    ref_st = c.ref[0][1][1]
    _assert_close(y, c.ref[0][1][0], "y")
    # Their sum is the global statistics ...
    for field in st._fields:
        _assert_close(jnp.sum(getattr(st, field), axis=0), getattr(ref_st, field), field)
    # ... and shard i holds exactly the statistics of rows i * B/8 ... (i+1) * B/8 - 1.
    rows = B // n_shards
    single = jax.jit(functools.partial(moe_layer, routed_top_k=c.k, n_shared=c.ns))
    for i in range(n_shards):
        sl = slice(i * rows, (i + 1) * rows)
        _, st_i = single(c.args[0][sl], c.segment_ids[sl], c.pool_sizes[sl], *c.args[1:])
        for field in st._fields:
            _assert_close(getattr(st, field)[i], getattr(st_i, field), f"{field}[{i}]")


def test_bad_stats_mode_and_bad_shapes_raise():
    mesh = _mesh((2, 1, 4))
    with pytest.raises(ValueError, match="stats must be 'global' or 'local'"):
        make_expert_parallel_moe(mesh, "all_to_all", stats="micro")
    fn = make_expert_parallel_moe(mesh, "all_to_all")
    x, wr, wg, wu, wd, _ = _inputs(1)
    seg = jnp.asarray(_segments())
    with pytest.raises(ValueError, match="6 experts do not divide over the expert axis of size 4"):
        fn(x, seg, None, wr[:, :5], wg[:6], wu[:6], wd[:6], routed_top_k=3, n_shared=1)
    with pytest.raises(ValueError, match="batch of 4 rows does not divide over the 8 batch shards"):
        fn(x[:4], seg[:4], None, wr, wg, wu, wd, routed_top_k=3, n_shared=1)


def test_local_group_keys_layouts():
    # 2 peers, 2 local experts. Peer 0 sent [2, 1], peer 1 sent [0, 3] rows.
    counts = jnp.asarray([[2, 1], [0, 3]], jnp.int32)
    dense = local_group_keys(counts, rows=10, chunk_capacity=5)
    np.testing.assert_array_equal(np.asarray(dense), [0, 0, 1, 2, 2, 1, 1, 1, 2, 2])
    ragged = local_group_keys(counts, rows=10, chunk_capacity=None)
    np.testing.assert_array_equal(np.asarray(ragged), [0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


# --- the real ragged_all_to_all (GPU / TPU only) ---------------------------------------

@pytest.mark.skipif(not compat.has_ragged_all_to_all(),
                    reason=f"jax.lax.ragged_all_to_all does not compile on backend '{jax.default_backend()}' "
                           "(XLA:CPU); runs on GPU/TPU")
@pytest.mark.parametrize("shape", [(2, 1, 4), (1, 1, 8)], ids=lambda s: "x".join(map(str, s)))
def test_real_ragged_all_to_all(emo_case, hot_case, shape):
    mesh = _mesh(shape)
    for case in (emo_case, hot_case):
        out = case.run(make_expert_parallel_moe(mesh, "ragged_all_to_all"), mesh)
        _assert_same(out, case.ref)


def test_two_shared_experts_with_their_router_match_single_device():
    """n_s = 2: the shared router (replicated) gives the same output and gradients as one device."""
    n_shared, k_r = 2, 2
    x, wr, wg, wu, wd, key = _inputs(n_shared, seed=3)
    ws = jax.random.normal(key, (D, n_shared))
    seg = jnp.asarray(_segments())

    def loss_fn(fn):
        def loss(x, wr, wg, wu, wd, ws):
            y, _ = fn(x, seg, None, wr, wg, wu, wd, routed_top_k=k_r, n_shared=n_shared, w_shared_router=ws)
            return jnp.sum(y * jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))

    (_, y_ref), g_ref = loss_fn(moe_layer)(x, wr, wg, wu, wd, ws)
    mesh = _mesh((2, 1, 4))
    with use_mesh(mesh):
        (_, y), g = loss_fn(make_expert_parallel_moe(mesh, "all_to_all"))(x, wr, wg, wu, wd, ws)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=RTOL, atol=1e-4)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(g[5])).sum() > 0


# --- bounded dense exchange (issue 16) ---------------------------------------------------

def _send_sizes(case, shape) -> np.ndarray:
    """[devices of one expert group over all batch shards, P] rows each device sends each
    peer: computed from the single-device routing (the shared expert is not sent)."""
    from emo_jax.moe import route_tokens
    x, wr = case.args[0], case.args[1]
    ids = np.asarray(route_tokens(x, case.segment_ids, case.pool_sizes, wr, case.k, case.ns)[0])
    valid = np.asarray(case.segment_ids) > 0
    n_peers, e_local = shape[2], E // shape[2]
    rows_per_shard = B // (shape[0] * shape[1] * shape[2])
    sizes = []
    for shard in range(B // rows_per_shard):
        rows = slice(shard * rows_per_shard, (shard + 1) * rows_per_shard)
        owner = ids[rows][valid[rows]] // e_local
        sizes.append(np.bincount(owner.reshape(-1), minlength=n_peers))
    return np.stack(sizes)


@pytest.mark.parametrize("shape, capacity, overflows",
                         [((1, 1, 8), 3.0, False), ((2, 1, 4), 2.0, False), ((2, 2, 2), 1.25, None),
                          ((1, 1, 8), 0.1, True)], ids=_case_id)
def test_bounded_exchange_matches_single_device(emo_case, shape, capacity, overflows):
    """The dense all_to_all with capacity x M / P rows per peer: exact against one device
    when nothing overflows (the bounded buffers are used) and when a device would send
    more than the capacity to a peer (that step takes the worst-case buffers)."""
    from emo_jax.parallel.expert_parallel import peer_capacity
    n_peers = shape[2]
    copies = (B // (shape[0] * shape[1] * shape[2])) * S * emo_case.k
    cap = peer_capacity(copies, n_peers, capacity)
    assert cap < copies, "the bounded path must be in the program"
    if overflows is not None:
        assert (_send_sizes(emo_case, shape).max() > cap) == overflows
    mesh = _mesh(shape)
    out = emo_case.run(make_expert_parallel_moe(mesh, "all_to_all", capacity_factor=capacity), mesh)
    _assert_same(out, emo_case.ref)


def test_bounded_exchange_sends_bounded_buffers():
    """The program holds the bounded [P, C, D] all_to_all (C = 2 x M / P = 12, rounded up
    to 16) next to the worst-case [P, M, D] one, selected by a cond on a global max."""
    mesh = _mesh((1, 1, 8))
    case_args = _inputs(1)
    x, wr, wg, wu, wd, _ = case_args
    seg = jnp.asarray(_segments())
    fn = make_expert_parallel_moe(mesh, "all_to_all", capacity_factor=2.0)
    with use_mesh(mesh):
        text = str(jax.make_jaxpr(lambda *a: fn(*a, routed_top_k=3, n_shared=1)[0])(x, seg, None, wr, wg, wu, wd))
    m = S * 3  # one row of 16 tokens per device, 3 routed copies each
    assert "cond[" in text and "pmax" in text
    exchanged = set(re.findall(r"(f32\[8,\d+,\d+\])\{[^}]*\} = all_to_all", text))
    assert exchanged == {f"f32[8,16,{D}]", f"f32[8,{m},{D}]"}, exchanged


def test_peer_capacity():
    from emo_jax.parallel.expert_parallel import peer_capacity
    assert peer_capacity(4096 * 8, 8, 1.5) == 6144
    assert peer_capacity(100, 4, 1.0) == 32  # 25 rounded up to 8
    assert peer_capacity(100, 2, 4.0) == 100  # never more than the worst case
    with pytest.raises(ValueError, match="exchange_capacity"):
        peer_capacity(100, 2, 0.0)
