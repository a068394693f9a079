"""Pallas MoE kernels (kernels.pallas / pallas_tpu / pallas_gpu) against the XLA reference.

On CPU the Mosaic TPU kernels run in TPU interpret mode with the race detector on and
uninitialised memory filled with NaN (so an unwritten row that leaked would show);
the Triton GPU kernels run in the generic Pallas interpreter (which also fills
outputs with NaN). Interpret mode is slow: shapes are tiny, and every timing here
means nothing. `accelerator` tests compile the kernels for the real device.

Checked: the layout bookkeeping; each raw kernel (NaN planted in every row it must not
read); the whole expert computation, forward and gradients, f32 and bf16, k = 1..8,
an expert with no tokens, padding tokens with NaN inputs and gates; the reference
contracts (dispatch, combine, grouped_matmul) the expert-parallel path uses; the
expert-parallel shard_map; the config switch; and that the kernels lower for TPU
(Mosaic) and GPU (Triton) at realistic tiles.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import kernels, moe, routing
from emo_jax.compat import use_mesh
from emo_jax.config import MeshConfig
from emo_jax.kernels import layout as layout_lib
from emo_jax.kernels import pallas, pallas_gpu, pallas_tpu, reference
from emo_jax.parallel import build_mesh, make_expert_parallel_moe

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # noqa: E402

# TPU interpret mode: race detector on, uninitialised memory = NaN.
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
TPU_BLOCK, GPU_BLOCK = 8, 16  # aligned block rows (tl.dot needs >= 16)
EMPTY = 1  # the expert no valid token routes to


def tpu_kernels():
    return pallas.kernel_set("cpu", TPU_INTERPRET, block_rows=TPU_BLOCK, tile_rows=8, tile_tokens=8)


def gpu_kernels():
    return pallas.kernel_set("gpu", True, block_rows=GPU_BLOCK, tile_rows=16, tile_tokens=8)


KERNEL_SETS = {"tpu_interpret": tpu_kernels, "gpu_interpret": gpu_kernels}


@pytest.fixture(autouse=True)
def no_races(capsys):
    """Fails a test whose TPU-interpreted kernels raced (the detector prints and flags)."""
    tpu_interpreter.reset_tpu_interpret_mode_state()
    yield
    out = capsys.readouterr().out
    tpu_interpreter.reset_tpu_interpret_mode_state()
    assert "RACE DETECTED" not in out, out


# ---------------------------------------------------------------------------- cases


class FfnCase(NamedTuple):
    x: jax.Array
    ids: np.ndarray
    gates: jax.Array
    valid: np.ndarray
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    cot: jax.Array


def ffn_case(t: int, k: int, e: int, d: int, h: int, dtype, seed: int = 0) -> FfnCase:
    """Tokens pick k distinct experts, never EMPTY; padding tokens (first, last, some
    others) carry NaN inputs and gates and point at EMPTY: none of it may leak."""
    rng = np.random.default_rng(seed)
    choices = [i for i in range(e) if i != EMPTY]
    ids = np.stack([rng.choice(choices, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    valid = rng.random(t) < 0.75
    valid[[0, t - 1]] = False
    ids[~valid, 0] = EMPTY
    x = rng.normal(size=(t, d))
    x[~valid] = np.nan
    gates = rng.uniform(0.1, 1.0, size=(t, k))
    gates[~valid] = np.nan
    f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.4, dtype)
    return FfnCase(jnp.asarray(x, dtype), ids, jnp.asarray(gates, jnp.float32), valid, f(e, d, h), f(e, d, h),
                   f(e, h, d), jnp.asarray(rng.normal(size=(t, d)), dtype))


def ffn_value_and_grads(ffn, case: FfnCase):
    """jit(value_and_grad) of sum(where(valid, y, 0) * cot) w.r.t. x, gates and weights."""
    valid = jnp.asarray(case.valid)

    def loss(x, gates, wg, wu, wd):
        y = ffn(x, jnp.asarray(case.ids), gates, valid, wg, wu, wd)
        return jnp.sum(jnp.where(valid[:, None], y, 0).astype(jnp.float32) * case.cot.astype(jnp.float32)), y

    f = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))
    return f(case.x, case.gates, case.w_gate, case.w_up, case.w_down)


def assert_close(actual, expected, name, dtype):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    rtol = 1e-5 if jnp.dtype(dtype) == jnp.float32 else 3e-2
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=name)


def check_ffn_against_reference(ks: pallas.KernelSet, case: FfnCase, dtype) -> None:
    (loss, y), grads = ffn_value_and_grads(pallas.backend(ks).moe_ffn, case)
    # The reference in float32 on the same (rounded) inputs.
    f32 = FfnCase(*(jnp.asarray(a, jnp.float32) if isinstance(a, jax.Array) else a for a in case))
    (ref_loss, ref_y), ref_grads = ffn_value_and_grads(reference.moe_ffn, f32)
    valid = case.valid
    # The loss is a sum with heavy cancellation: its error scales with sum |y * cot|.
    magnitude = float(np.sum(np.abs(np.asarray(ref_y)[valid] * np.asarray(f32.cot)[valid])))
    tol = 1e-6 if jnp.dtype(dtype) == jnp.float32 else 1e-3
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=0, atol=tol * magnitude, err_msg="loss")
    assert_close(np.asarray(y, np.float32)[valid], np.asarray(ref_y)[valid], "y", dtype)
    assert np.all(np.asarray(y, np.float32)[~valid] == 0.0), "padding tokens must give exactly 0"
    for name, g, rg in zip(("d_x", "d_gates", "d_w_gate", "d_w_up", "d_w_down"), grads, ref_grads):
        assert g.dtype == (jnp.float32 if name == "d_gates" else dtype), name
        assert_close(g, rg, name, dtype)
    gx, ggates, *gw = (np.asarray(jnp.asarray(g, jnp.float32)) for g in grads)
    assert np.all(gx[~valid] == 0.0) and np.all(ggates[~valid] == 0.0)
    for g in gw:  # the expert without tokens: exactly zero gradient
        assert np.all(g[EMPTY] == 0.0)


# ---------------------------------------------------------------------------- layout


@pytest.mark.parametrize("k, block_rows", [(1, 4), (8, 16)])
def test_group_layout_invariants(k, block_rows):
    t, e = 24, 10
    rng = np.random.default_rng(k)
    ids = np.stack([rng.choice([i for i in range(e) if i not in (EMPTY, e - 1)], size=k, replace=False)
                    for _ in range(t)]).astype(np.int32)
    valid = rng.random(t) < 0.7
    lay = jax.jit(layout_lib.group_layout, static_argnums=(2, 3))(jnp.asarray(ids), jnp.asarray(valid), e,
                                                                 block_rows)
    lay = jax.tree.map(np.asarray, lay)
    rows, r = lay.rows, block_rows
    nb = layout_lib.num_blocks(t * k, e, r)
    assert lay.block_expert.shape == (nb,) and rows.row_token.shape == (nb * r,) and lay.block_size == r
    counts = np.bincount(ids[valid].reshape(-1), minlength=e)
    np.testing.assert_array_equal(lay.group_sizes, counts)
    blocks = -(-counts // r)
    np.testing.assert_array_equal(lay.group_blocks, blocks)
    assert lay.used_blocks[0] == blocks.sum() and rows.used_rows[0] == blocks.sum() * r
    # Every real copy sits in a block of its expert; blocks hold their rows first.
    flat_ids, flat_valid = ids.reshape(-1), np.repeat(valid, k)
    np.testing.assert_array_equal(rows.copy_valid.reshape(-1), flat_valid)
    real_rows = rows.copy_row.reshape(-1)[flat_valid]
    assert len(set(real_rows.tolist())) == len(real_rows)  # distinct rows
    np.testing.assert_array_equal(lay.block_expert[real_rows // r], flat_ids[flat_valid])
    np.testing.assert_array_equal(real_rows % r < lay.block_rows[real_rows // r], True)
    assert rows.row_valid.sum() == flat_valid.sum() == lay.block_rows.sum()
    # Row -> copy -> row round trip, and the token of each row.
    live = np.flatnonzero(rows.row_valid)
    np.testing.assert_array_equal(rows.copy_row.reshape(-1)[rows.row_copy[live]], live)
    np.testing.assert_array_equal(rows.row_token[live], rows.row_copy[live] // k)
    assert np.all(live < rows.used_rows[0])
    # Visits: every expert at least once, the empty ones with 0 rows, in expert order.
    n_vis = lay.num_visits[0]
    assert n_vis == blocks.sum() + (blocks == 0).sum()
    ve = lay.visit_expert[:n_vis]
    assert np.all(np.diff(ve) >= 0) and set(ve.tolist()) == set(range(e))
    for ex in range(e):
        sel = ve == ex
        assert lay.visit_rows[:n_vis][sel].sum() == counts[ex]
        if counts[ex]:
            np.testing.assert_array_equal(lay.block_expert[lay.visit_block[:n_vis][sel]], ex)


def test_sorted_row_map_matches_reference_dispatch():
    rng = np.random.default_rng(0)
    t, k, e = 9, 3, 5
    ids = jnp.asarray(rng.integers(0, e, size=(t, k)), jnp.int32)
    valid = jnp.asarray(rng.random(t) < 0.6)
    d = reference.dispatch(jnp.arange(t, dtype=jnp.float32)[:, None], ids, valid, e)
    rows = jax.tree.map(np.asarray, layout_lib.sorted_row_map(d.order, d.valid_sorted, k))
    vs = np.asarray(d.valid_sorted)
    np.testing.assert_array_equal(rows.row_valid, vs)
    np.testing.assert_array_equal(rows.row_token[vs], np.asarray(d.order)[vs] // k)  # padding rows: token 0
    np.testing.assert_array_equal(rows.copy_row.reshape(-1)[np.asarray(d.order)[vs]], np.flatnonzero(vs))


# ---------------------------------------------------------------------------- raw TPU kernels


@pytest.fixture(scope="module")
def raw():
    """A layout with an empty expert, padding tokens, intra-block padding rows and
    unused tail blocks; buffers with NaN in every row a kernel must not read."""
    rng = np.random.default_rng(1)
    t, k, e, d, h, r = 16, 3, 5, 16, 32, TPU_BLOCK
    ids = np.stack([rng.choice([0, 2, 3, 4], size=k, replace=False) for _ in range(t)]).astype(np.int32)
    valid = rng.random(t) < 0.8
    valid[0] = False
    lay = jax.jit(layout_lib.group_layout, static_argnums=(2, 3))(jnp.asarray(ids), jnp.asarray(valid), e, r)
    assert int(lay.used_blocks[0]) < lay.block_expert.shape[0]  # there are unused tail blocks
    row_valid = np.asarray(lay.rows.row_valid) > 0

    def buffer(width):
        b = rng.normal(size=(row_valid.shape[0], width)).astype(np.float32)
        b[~row_valid] = np.nan  # padding rows and tail blocks
        return jnp.asarray(b)

    x = rng.normal(size=(t, d)).astype(np.float32)
    x[~valid] = np.nan
    return dict(lay=lay, np_lay=jax.tree.map(np.asarray, lay), ids=ids, valid=valid, x=jnp.asarray(x),
                xs=buffer(d), dy=buffer(h), w=jnp.asarray(rng.normal(size=(e, d, h)), jnp.float32),
                gates=jnp.asarray(rng.uniform(size=(t, k)), jnp.float32), e=e, r=r)


def _races_found() -> bool:
    return bool(tpu_interpreter.races is not None and tpu_interpreter.races.races_found)


@pytest.mark.parametrize("scaled", [False, True])
def test_tpu_gather_rows(raw, scaled):
    rows = raw["np_lay"].rows
    scale = jnp.asarray(np.random.default_rng(2).uniform(size=rows.row_token.shape), jnp.float32) if scaled else None
    lay_rows = raw["lay"].rows
    out = np.asarray(pallas_tpu.gather_rows(raw["x"], lay_rows.row_token, lay_rows.row_valid, lay_rows.used_rows,
                                            scale, tile_rows=8, interpret=TPU_INTERPRET))
    assert not _races_found()
    used = rows.used_rows[0]
    expected = np.where(rows.row_valid[:, None] > 0, np.asarray(raw["x"])[rows.row_token], 0.0)
    if scaled:
        expected = expected * np.asarray(scale)[:, None]
    np.testing.assert_allclose(out[:used], expected[:used], rtol=1e-6)
    assert np.all(np.isnan(out[used:])), "tail blocks are never written (NaN = uninitialised)"


def test_tpu_combine_and_gate_grads(raw):
    rows, lay = raw["np_lay"].rows, raw["lay"]
    ys = raw["dy"]
    got = pallas_tpu.combine_rows(ys, lay.rows.copy_row, lay.rows.copy_valid, raw["gates"], tile_tokens=8,
                                  interpret=TPU_INTERPRET)
    assert not _races_found()
    gathered = np.where(rows.copy_valid[..., None] > 0, np.asarray(ys)[rows.copy_row], 0.0)  # [T, K, H]
    np.testing.assert_allclose(np.asarray(got), np.einsum("tkh,tk->th", gathered, np.asarray(raw["gates"])),
                               rtol=1e-5, atol=1e-5)
    dy = jnp.asarray(np.random.default_rng(3).normal(size=(raw["x"].shape[0], ys.shape[1])), jnp.float32)
    dg = pallas_tpu.combine_rows(ys, lay.rows.copy_row, lay.rows.copy_valid, dy, gate_grads=True, tile_tokens=8,
                                 interpret=TPU_INTERPRET)
    assert not _races_found()
    np.testing.assert_allclose(np.asarray(dg), np.einsum("tkh,th->tk", gathered, np.asarray(dy)), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(dg)[~raw["valid"]] == 0.0)


def _np_gmm(lhs, w, lay, r):
    """Reference: each used block times its expert's weights; padding rows 0."""
    out = np.zeros((lhs.shape[0], w.shape[-1]), np.float64)
    for b in range(lay.used_blocks[0]):
        n = lay.block_rows[b]
        out[b * r:b * r + n] = lhs[b * r:b * r + n].astype(np.float64) @ w[lay.block_expert[b]]
    return out


@pytest.mark.parametrize("transpose", [False, True])
def test_tpu_gmm(raw, transpose):
    lay, r = raw["np_lay"], raw["r"]
    w = np.asarray(raw["w"])
    lhs, rhs, w_eff = ((raw["dy"], raw["w"], np.swapaxes(w, 1, 2)) if transpose else (raw["xs"], raw["w"], w))
    out = np.asarray(pallas_tpu.gmm(lhs, rhs, raw["lay"], transpose_rhs=transpose, interpret=TPU_INTERPRET))
    assert not _races_found()
    used = lay.used_blocks[0] * r
    np.testing.assert_allclose(out[:used], _np_gmm(np.asarray(lhs), w_eff, lay, r)[:used], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(out[:used])), "NaN in padding rows leaked"


def test_tpu_tgmm_writes_zeros_for_empty_experts(raw):
    lay, r, e = raw["np_lay"], raw["r"], raw["e"]
    out = np.asarray(pallas_tpu.tgmm(raw["xs"], raw["dy"], raw["lay"], num_experts=e, interpret=TPU_INTERPRET))
    assert not _races_found()
    xs, dy = np.asarray(raw["xs"]), np.asarray(raw["dy"])
    expected = np.zeros((e, xs.shape[1], dy.shape[1]))
    for b in range(lay.used_blocks[0]):
        n = lay.block_rows[b]
        expected[lay.block_expert[b]] += xs[b * r:b * r + n].T.astype(np.float64) @ dy[b * r:b * r + n]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert np.all(out[EMPTY] == 0.0)


# ---------------------------------------------------------------------------- the expert computation

def _case_id(kernel_set, dtype, k):
    return f"{kernel_set}-{jnp.dtype(dtype).name}-k{k}"


# Interpret mode is slow (the TPU interpreter most): the default run covers both kernel
# sets, both dtypes and k = 1, 2, 3, 5, 8; the full matrix (every k, dtype and kernel
# set) is `test_moe_ffn_matches_reference_all`, marked slow.
FFN_CASES = [
    ("gpu_interpret", jnp.float32, 1),
    ("gpu_interpret", jnp.bfloat16, 2),
    ("gpu_interpret", jnp.float32, 5),
    ("gpu_interpret", jnp.bfloat16, 8),
    ("tpu_interpret", jnp.float32, 3),
    pytest.param("tpu_interpret", jnp.bfloat16, 8, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kernel_set, dtype, k", FFN_CASES,
                         ids=[_case_id(*(c.values if hasattr(c, "values") else c)) for c in FFN_CASES])
def test_moe_ffn_matches_reference(kernel_set, dtype, k):
    case = ffn_case(t=16, k=k, e=10, d=16, h=32, dtype=dtype, seed=k)
    check_ffn_against_reference(KERNEL_SETS[kernel_set](), case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("kernel_set", list(KERNEL_SETS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", list(range(1, 9)))
def test_moe_ffn_matches_reference_all(kernel_set, dtype, k):
    case = ffn_case(t=64, k=k, e=12, d=32, h=32, dtype=dtype, seed=10 + k)
    check_ffn_against_reference(KERNEL_SETS[kernel_set](), case, dtype)


@pytest.mark.parametrize("kernel_set", ["gpu_interpret", pytest.param("tpu_interpret", marks=pytest.mark.slow)])
def test_reference_contracts(kernel_set):
    """dispatch / combine / grouped_matmul with `kernels.reference`'s contracts (what the
    expert-parallel path calls), forward and gradients."""
    ks = KERNEL_SETS[kernel_set]()
    be = pallas.backend(ks)
    rng = np.random.default_rng(4)
    t, k, e, d, h = 16, 2, 6, 16, 16
    ids = jnp.asarray(np.stack([rng.choice([0, 2, 3, 5], size=k, replace=False) for _ in range(t)]), jnp.int32)
    valid = jnp.asarray(rng.random(t) < 0.7)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    gates = jnp.asarray(rng.uniform(size=(t, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(e, d, h)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(t, h)), jnp.float32)

    def loss(impl):
        def f(x, gates, w):
            sent = impl.dispatch(x, ids, valid, e)
            y_sorted = impl.grouped_matmul(sent.x_sorted, w, sent.group_sizes)
            return jnp.sum(impl.combine(y_sorted, sent.order, sent.valid_sorted, gates) * cot), y_sorted
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(x, gates, w)

    (val, y_sorted), grads = loss(be)
    (ref_val, ref_y_sorted), ref_grads = loss(kernels.backend_for("reference"))
    assert_close(val, ref_val, "loss", jnp.float32)
    assert_close(y_sorted, ref_y_sorted, "grouped_matmul rows (past sum(group_sizes) = 0)", jnp.float32)
    for name, g, rg in zip(("d_x", "d_gates", "d_w"), grads, ref_grads):
        assert_close(g, rg, name, jnp.float32)


# ---------------------------------------------------------------------------- expert parallelism


def _ep_loss_and_grads(fn, seg, pool_sizes, k_r, n_shared):
    def loss(x, wr, wg, wu, wd):
        y, st = fn(x, seg, pool_sizes, wr, wg, wu, wd, routed_top_k=k_r, n_shared=n_shared)
        return jnp.sum(y * jnp.sin(y)) + jnp.sum(st.prob_sums * jnp.arange(1, st.prob_sums.shape[-1] + 1)), y

    return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))


def _check_expert_parallel(ks: pallas.KernelSet, mesh, b: int, s: int) -> None:
    """make_expert_parallel_moe(backend=pallas) equals the single-device reference layer,
    including an expert without tokens on one peer and padding tokens."""
    d, h, e, n_shared, k_r = 16, 16, 4, 1, 1
    rng = np.random.default_rng(5)
    x = jnp.asarray(np.abs(rng.normal(size=(b, s, d))) + 0.5, jnp.float32)  # positive features ...
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2
    seg[0, -1] = 0  # padding
    seg = jnp.asarray(seg)
    wr = jnp.asarray(rng.normal(size=(d, e - n_shared)), jnp.float32)
    wr = wr.at[:, EMPTY].set(-5.0)  # ... so routed expert EMPTY never wins: no tokens anywhere
    f = lambda *sh: jnp.asarray(rng.normal(size=sh) * 0.3, jnp.float32)
    ws = (f(e, d, h), f(e, d, h), f(e, h, d))
    pools = routing.draw_pool_sizes(jax.random.PRNGKey(0), (b, s + 1), k_r, e - n_shared)
    ep = make_expert_parallel_moe(mesh, "all_to_all", backend=pallas.backend(ks))
    with use_mesh(mesh):
        (val, y), grads = _ep_loss_and_grads(ep, seg, pools, k_r, n_shared)(x, wr, *ws)
    (ref_val, ref_y), ref_grads = _ep_loss_and_grads(moe.moe_layer, seg, pools, k_r, n_shared)(x, wr, *ws)
    assert_close(val, ref_val, "loss", jnp.float32)
    assert_close(y, ref_y, "y", jnp.float32)
    assert np.all(np.asarray(y)[np.asarray(seg) == 0] == 0.0)
    for name, g, rg in zip(("d_x", "d_router", "d_w_gate", "d_w_up", "d_w_down"), grads, ref_grads):
        assert_close(g, rg, name, jnp.float32)
    for g in grads[2:]:
        assert np.all(np.asarray(g)[EMPTY] == 0.0)


def test_expert_parallel_with_tpu_kernels():
    """TPU kernels (interpreted, race detector on) inside shard_map(check_vma=True) on a
    data x expert = 1 x 2 mesh: gradients of the replicated router and of the
    expert-sharded weights go through the custom VJPs' psum_to_match."""
    mesh = build_mesh(MeshConfig(1, 1, 2), devices=jax.devices()[:2])
    _check_expert_parallel(tpu_kernels(), mesh, b=2, s=4)


@pytest.mark.slow
def test_expert_parallel_with_tpu_kernels_data_and_expert_axes():
    """As above on data x expert = 2 x 2: expert-weight gradients summed over `data`."""
    mesh = build_mesh(MeshConfig(2, 1, 2), devices=jax.devices()[:4])
    _check_expert_parallel(tpu_kernels(), mesh, b=4, s=4)


@pytest.mark.accelerator
def test_expert_parallel_with_compiled_kernels():
    """The compiled kernels of the device inside shard_map. (The generic Pallas interpreter
    that runs the Triton kernels on CPU fails under shard_map(check_vma=True) on jax 0.10:
    'dynamic_slice requires varying manual axes to match'; BUILD_NOTES.md, Pallas quirk 2.)"""
    if jax.default_backend() not in ("gpu", "tpu"):
        pytest.skip("needs a GPU or TPU")
    n = min(jax.device_count(), 2)
    mesh = build_mesh(MeshConfig(1, 1, n), devices=jax.devices()[:n])
    _check_expert_parallel(pallas.kernel_set(jax.default_backend()), mesh, b=2 * n, s=64)


# ---------------------------------------------------------------------------- selection


def test_backend_selection_and_config():
    from helpers import tiny_config

    assert kernels.resolve_backend("auto", "cpu") == "capacity"
    assert kernels.resolve_backend("auto", "gpu") == "reference"  # pallas stays opt-in until measured
    assert kernels.resolve_backend("pallas") == "pallas"
    with pytest.raises(ValueError, match="kernels.moe_backend"):
        kernels.resolve_backend("triton")
    be = kernels.backend_for("pallas", "cpu")
    assert be.name == "pallas_tpu_interpret" and be is kernels.backend_for("pallas", "cpu")
    assert kernels.backend_for("pallas", "gpu").name == "pallas_gpu"
    assert kernels.backend_for("pallas", "tpu").name == "pallas_tpu"
    assert kernels.backend_for("blocked").grouped_matmul is kernels.grouped_matmul_for("blocked")
    assert tiny_config("kernels.moe_backend=pallas").kernels.moe_backend == "pallas"
    with pytest.raises(Exception, match="moe_backend"):
        tiny_config("kernels.moe_backend=cuda")


# ---------------------------------------------------------------------------- lowering at real tiles


def _lowering_case(dtype=jnp.bfloat16, t=256, k=8, e=8, d=256, h=512, r=128):
    ids = jnp.asarray(np.random.default_rng(6).integers(0, e, size=(t, k)), jnp.int32)
    lay = jax.jit(layout_lib.group_layout, static_argnums=(2, 3))(ids, jnp.ones((t,), bool), e, r)
    nr = lay.rows.row_token.shape[0]
    z = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    return lay, dict(x=z(t, d), xs=z(nr, d), hs=z(nr, h), w=z(e, d, h), gates=jax.ShapeDtypeStruct((t, k), jnp.float32),
                     dy=z(t, d), e=e)


def _lower_all(mod, platform, lay, s, context):
    """Lowers every raw kernel for `platform` inside `context()` (an abstract device)."""
    from lowering_helpers import shapes_only

    rows = lay.rows
    calls = {
        "gather": (mod.gather_rows, (s["x"], rows.row_token, rows.row_valid, rows.used_rows,
                                     jnp.ones(rows.row_token.shape, jnp.float32))),
        "combine": (mod.combine_rows, (s["xs"], rows.copy_row, rows.copy_valid, s["gates"])),
        "gate_grads": (functools.partial(mod.combine_rows, gate_grads=True),
                       (s["xs"], rows.copy_row, rows.copy_valid, s["dy"])),
        "gmm": (mod.gmm, (s["xs"], s["w"], lay)),
        "gmm_transposed": (functools.partial(mod.gmm, transpose_rhs=True), (s["hs"], s["w"], lay)),
        "tgmm": (functools.partial(mod.tgmm, num_experts=s["e"]), (s["xs"], s["hs"], lay)),
    }
    for name, (fn, args) in calls.items():
        try:
            with context():
                jax.jit(fn).trace(*shapes_only(args)).lower(lowering_platforms=(platform,))
        except Exception as err:  # noqa: BLE001 - report which kernel
            raise AssertionError(f"{name} does not lower for {platform}: {err}") from err


def test_tpu_kernels_lower_for_tpu_at_real_tiles():
    """Mosaic lowering (block-shape rules, SMEM blocks, DMAs) for a TPU v5e, without a TPU.
    Mosaic's own compiler passes run only on a TPU host."""
    from lowering_helpers import abstract_device, has_abstract_device

    if not has_abstract_device():
        pytest.skip("no abstract TPU device in this jax")
    _lower_all(pallas_tpu, "tpu", *_lowering_case(), lambda: abstract_device("TPU v5 lite", "tpu"))


def test_gpu_kernels_lower_for_cuda_at_real_tiles():
    """The Triton lowering (power-of-two tiles, pointer gathers) without a GPU; PTX is
    compiled on the device. jax 0.12 reads the compute capability from an abstract GPU."""
    from lowering_helpers import abstract_gpu

    _lower_all(pallas_gpu, "cuda", *_lowering_case(), abstract_gpu)


# ---------------------------------------------------------------------------- on a real accelerator


@pytest.mark.accelerator
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_compiled_pallas_backend_on_device(dtype):
    platform = jax.default_backend()
    if platform not in ("gpu", "tpu"):
        pytest.skip("needs a GPU or TPU")
    ks = pallas.kernel_set(platform)
    case = ffn_case(t=512, k=8, e=16, d=256, h=256, dtype=dtype, seed=7)
    check_ffn_against_reference(ks, case, dtype)
