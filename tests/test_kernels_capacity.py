"""The `capacity` expert SwiGLU (the CPU default backend) against the reference
(three `jax.lax.ragged_dot`): values and the gradients w.r.t. the rows and the three
weights, with and without overflow past the capacity, empty groups, padding rows, and
the whole dropless layer. Inside shard_map it is covered by tests/test_parallel_moe.py
(the expert-parallel layer's default backend on CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import kernels
from emo_jax.kernels.capacity import (OVERFLOW_BLOCK_ROWS, _static_sizes, capacity_for, default_block_sizes,
                                      grouped_swiglu_capacity, overflow_block_sizes, plan_for_sorted_rows)
from emo_jax.kernels.reference import grouped_swiglu
from moe_layer_check import assert_layer_matches_reference  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5)


def _problem(seed: int, rows: int, d: int, h: int, sizes: list[int]):
    rng = np.random.default_rng(seed)
    e = len(sizes)
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in ((e, d, h), (e, d, h), (e, h, d))]
    probe = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    return x, w, jnp.asarray(sizes, jnp.int32), probe


CASES = [
    # rows, d, h, group sizes (sum <= rows: the rest is padding), capacity factor, overflow block rows
    (64, 16, 8, [10, 0, 30, 24], 1.0, 8),       # overflow of one group (C = 16), an empty group
    (64, 16, 8, [10, 0, 30, 4], 4.0, 8),        # no overflow; 20 padding rows must give 0
    (50, 8, 12, [50, 0, 0, 0, 0], 1.0, 64),     # everything in one group; R clamped to M
    (37, 8, 8, [1, 1, 1, 30, 0, 4], 0.1, 4),    # tiny capacity: nearly all rows overflow
    (37, 8, 8, [1, 1, 1, 30, 0, 4], 0.1, 5),    # ... blocks not dividing the overflow
    (16, 4, 4, [0, 0, 0, 0], 1.0, 8),           # no real row at all
    (100, 16, 8, [30, 0, 5, 40, 1, 14], 0.5, 3),  # overflow blocks near the end of the buffer
    (100, 16, 8, [30, 0, 5, 40, 1, 14], 0.1, (16, 3)),  # two block sizes (the default has two)
    (37, 8, 8, [1, 1, 1, 30, 0, 4], 0.1, (64, 8, 3)),   # three, the largest clamped to M
]


@pytest.mark.parametrize("rows, d, h, sizes, cf, block", CASES)
def test_capacity_swiglu_matches_reference_values_and_gradients(rows, d, h, sizes, cf, block):
    x, w, group_sizes, probe = _problem(rows + d, rows, d, h, sizes)

    def run(fn):
        loss = lambda x, *w: jnp.sum(fn(x, *w) * probe)
        return jax.jit(fn)(x, *w), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, *w)

    (y, grads), (y_ref, grads_ref) = (
        run(lambda x, *w: grouped_swiglu_capacity(x, *w, group_sizes, capacity_factor=cf, block_rows=block)),
        run(lambda x, *w: grouped_swiglu(x, *w, group_sizes)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)
    assert not np.any(np.asarray(y)[int(sum(sizes)):]), "rows past sum(group_sizes) must be 0"
    for got, want, name in zip(grads, grads_ref, ("d x", "d w_gate", "d w_up", "d w_down")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=name, **TOL)
    empty = [i for i, s in enumerate(sizes) if s == 0]
    for g in grads[1:]:
        assert not np.any(np.asarray(g)[empty]), "an expert without rows gets a zero gradient"


def test_overflow_is_really_exercised():
    """The cases above overflow: C = 16 with a group of 30 -> 2 overflow blocks of 8."""
    assert capacity_for(64, 4, 1.0) == 16
    plan = plan_for_sorted_rows(jnp.asarray([10, 0, 30, 24], jnp.int32), 64, 16, (8,))
    (tier,) = plan.overflow
    np.testing.assert_array_equal(np.asarray(tier.blocks), [0, 0, 2, 1])
    assert int(tier.num_blocks) == 3
    copy_slot = np.asarray(plan.copy_slot)
    # 14 + 8 overflow rows and the 0 padding rows have no slot; the others one each.
    assert (copy_slot == 4 * 16).sum() == 14 + 8
    assert sorted(copy_slot[copy_slot < 64]) == sorted(set(copy_slot[copy_slot < 64]))
    slot_copy = np.asarray(plan.slot_copy)
    np.testing.assert_array_equal(copy_slot[slot_copy[slot_copy < 64]], np.flatnonzero(slot_copy < 64))


def test_overflow_tiers_split_each_experts_overflow_by_block_size():
    """Overflow 0, 5, 20, 37 rows with blocks (16, 4): whole 16-row blocks first, the
    rest in 4-row blocks (the last may be partial); every overflow row in exactly one."""
    sizes = jnp.asarray([8, 13, 28, 45], jnp.int32)  # capacity 8
    big, small = plan_for_sorted_rows(sizes, 100, 8, (16, 4)).overflow
    np.testing.assert_array_equal(np.asarray(big.rows), [0, 0, 16, 32])
    np.testing.assert_array_equal(np.asarray(big.blocks), [0, 0, 1, 2])
    np.testing.assert_array_equal(np.asarray(small.rows), [0, 5, 4, 5])
    np.testing.assert_array_equal(np.asarray(small.blocks), [0, 2, 1, 2])
    np.testing.assert_array_equal(np.asarray(small.first), np.asarray(big.first) + np.asarray(big.rows))
    np.testing.assert_array_equal(np.asarray(big.first), [8, 16, 29, 57])  # group start + capacity
    assert overflow_block_sizes((4, 16, 4), 100) == (16, 4)
    assert overflow_block_sizes(64, 10) == (10,)  # never above the rows there are
    # Default sizes: each kept only where the copies hold 24 blocks of it; 32 always.
    assert default_block_sizes(32768) == default_block_sizes(12288) == OVERFLOW_BLOCK_ROWS  # S2, reproduction
    assert default_block_sizes(12287) == (256, 128, 64, 32)
    assert default_block_sizes(3072) == (128, 64, 32)  # configs/tiny.yaml
    assert default_block_sizes(100) == (32,)
    # The expert-parallel receive buffer: sizes follow its expected fill, not its length.
    assert _static_sizes(32768, 8, 1.0, 3072, None) == (384, (128, 64, 32))
    assert _static_sizes(3072, 8, 1.0, None, (16, 4)) == (384, (16, 4))  # explicit sizes as given
    with pytest.raises(ValueError, match="overflow block sizes"):
        overflow_block_sizes((0,), 10)


def test_capacity_jits_once_for_any_grouping():
    """Group sizes (and so the overflow) are data, not shapes: one program for every routing."""
    x, w, _, _ = _problem(0, 32, 8, 8, [8, 8, 8, 8])
    f = jax.jit(lambda x, g, *w: grouped_swiglu_capacity(x, *w, g, block_rows=4))
    for sizes in ([32, 0, 0, 0], [0, 0, 0, 32], [5, 7, 11, 9], [1, 2, 3, 4]):
        g = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(np.asarray(f(x, g, *w)), np.asarray(grouped_swiglu(x, *w, g)), **TOL)
    assert f._cache_size() == 1


def test_capacity_rejects_a_bad_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_for(64, 4, 0.0)


@pytest.mark.parametrize("expected_rows", [None, 16])
def test_capacity_backend_layer_matches_reference_layer(expected_rows):
    """The whole dropless layer (dispatch, SwiGLU, combine) with padding tokens and the
    gradient of every input; expected_rows=16 sizes the slab far below the 120 copies."""
    backend = kernels.backend_for("capacity")
    assert backend.name == "capacity" and kernels.resolve_backend("auto", "cpu") == "capacity"
    assert_layer_matches_reference(kernels.local_expert_ffn(backend, expected_rows) if expected_rows
                                   else backend.moe_ffn, **TOL)


def test_capacity_in_bfloat16_is_close_to_float32():
    x, w, group_sizes, _ = _problem(5, 64, 16, 8, [10, 0, 30, 24])
    y32 = grouped_swiglu_capacity(x, *w, group_sizes)
    y16 = grouped_swiglu_capacity(x.astype(jnp.bfloat16), *(v.astype(jnp.bfloat16) for v in w), group_sizes)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


def _skewed_layer_inputs(seed: int, tokens: int = 48, d: int = 8, h: int = 12, e: int = 5, k: int = 3):
    """Most copies on experts 0 and 1 (so they overflow any capacity near the mean),
    expert 4 unused, ~25% padding tokens."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    ids = np.stack([np.concatenate([[0, 1], rng.choice([2, 3], size=k - 2, replace=False)]) for _ in range(tokens)])
    ids = jnp.asarray(rng.permuted(ids, axis=1), jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(tokens, k)), jnp.float32)
    valid = jnp.asarray(rng.uniform(size=tokens) > 0.25)
    w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in ((e, d, h), (e, d, h), (e, h, d))]
    cot = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    return x, ids, gates, valid, w, cot


@pytest.mark.parametrize("capacity_factor, block_rows", [(1.0, 32), (1.0, 5), (0.1, 4), (4.0, 8), (0.1, (16, 4)),
                                                         (0.1, (32, 8, 3))])
def test_capacity_layer_under_skew_matches_reference(capacity_factor, block_rows):
    """The fused layer (slab gathered from the tokens, combine gathered from the slab,
    overflow copies scatter-added per token) against the reference layer: value and the
    gradients of x, gates and the weights, with most copies overflowing."""
    from emo_jax.kernels.capacity import moe_ffn_capacity
    from emo_jax.kernels.reference import moe_ffn
    x, ids, gates, valid, w, cot = _skewed_layer_inputs(0)

    def run(ffn):
        loss = lambda x, g, *w: jnp.sum(ffn(x, ids, g, valid, *w) * cot)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, gates, *w)

    (v, grads), (v_ref, grads_ref) = (
        run(lambda *a: moe_ffn_capacity(*a, capacity_factor=capacity_factor, block_rows=block_rows)),
        run(moe_ffn))
    np.testing.assert_allclose(float(v), float(v_ref), **TOL)
    for got, want, name in zip(grads, grads_ref, ("x", "gates", "w_gate", "w_up", "w_down")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=name, **TOL)
    for g in grads[2:]:
        assert not np.any(np.asarray(g)[4]), "the unused expert gets a zero gradient"
    assert not np.any(np.asarray(grads[0])[~np.asarray(valid)]), "padding tokens get no input gradient"
    capacity = capacity_for(x.shape[0] * 3, 5, capacity_factor)
    overflow = max(int(jnp.sum(valid)) - capacity, 0)
    assert (overflow > 0) == (capacity_factor <= 1.0), "the case is meant to (not) overflow"


@pytest.mark.parametrize("last_expert_overflows", [False, True])
def test_capacity_layer_nan_in_padding_tokens_does_not_leak(last_expert_overflows):
    """NaN in padding tokens' inputs (and gates) never reaches valid outputs or any
    gradient: padding copies are in no slot and no overflow block. With the last expert
    overflowing, its last overflow block also spans the padding copies (sorted after
    every group), which the block's mask must keep out."""
    from emo_jax.kernels.capacity import moe_ffn_capacity
    x, ids, gates, valid, w, cot = _skewed_layer_inputs(1)
    if last_expert_overflows:
        ids = jnp.broadcast_to(jnp.asarray([4, 3, 2], jnp.int32), ids.shape)
    pad = np.flatnonzero(~np.asarray(valid))
    f = jax.jit(jax.value_and_grad(
        lambda x, g, *w: jnp.sum(jnp.where(valid[:, None], moe_ffn_capacity(x, ids, g, valid, *w), 0) * cot),
        argnums=(0, 1, 2, 3, 4)))
    clean = f(x, gates, *w)
    dirty = f(x.at[pad].set(jnp.nan), gates.at[pad].set(jnp.nan), *w)
    assert np.isfinite(float(dirty[0]))
    np.testing.assert_array_equal(float(dirty[0]), float(clean[0]))
    for a, b in zip(dirty[1], clean[1]):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y = moe_ffn_capacity(x.at[pad].set(jnp.nan), ids, gates, valid, *w)
    assert not np.any(np.asarray(y)[pad]), "padding tokens give 0"


def test_capacity_layer_with_one_copy_per_token_matches_reference():
    """K = 1, as the expert-parallel path calls it on a receive buffer (gates of 1), and
    with learned gates: values and every gradient against the reference layer."""
    from emo_jax.kernels.capacity import moe_ffn_capacity
    from emo_jax.kernels.reference import moe_ffn
    rng = np.random.default_rng(7)
    tokens, d, h, e = 70, 8, 12, 4
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    ids = jnp.asarray(rng.choice(e, size=(tokens, 1), p=[0.6, 0.3, 0.1, 0.0]), jnp.int32)
    valid = jnp.asarray(rng.uniform(size=tokens) > 0.2)
    w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in ((e, d, h), (e, d, h), (e, h, d))]
    cot = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    for gates in (jnp.ones((tokens, 1), jnp.float32), jnp.asarray(rng.uniform(0.1, 1, (tokens, 1)), jnp.float32)):
        def run(ffn):
            loss = lambda x, g, *w: jnp.sum(ffn(x, ids, g, valid, *w) * cot)  # noqa: E731
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, gates, *w)
        (v, grads), (v_ref, grads_ref) = run(functools.partial(moe_ffn_capacity, block_rows=(16, 4))), run(moe_ffn)
        np.testing.assert_allclose(float(v), float(v_ref), **TOL)
        for got, want, name in zip(grads, grads_ref, ("x", "gates", "w_gate", "w_up", "w_down")):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=name, **TOL)


def test_capacity_layer_in_bfloat16_is_as_close_to_float32_as_the_reference():
    """bfloat16 inputs and weights: output dtype kept; value and gradients within the
    reference layer's own bfloat16 error (measured against the float32 reference)."""
    from emo_jax.kernels.capacity import moe_ffn_capacity
    from emo_jax.kernels.reference import moe_ffn
    x, ids, gates, valid, w, cot = _skewed_layer_inputs(2)

    def run(ffn, dtype):
        loss = lambda x, g, *w: jnp.sum(ffn(x, ids, g, valid, *w).astype(jnp.float32) * cot)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))(
            x.astype(dtype), gates, *(v.astype(dtype) for v in w))

    _, exact = run(moe_ffn, jnp.float32)
    _, ref16 = run(moe_ffn, jnp.bfloat16)
    _, got16 = run(moe_ffn_capacity, jnp.bfloat16)
    assert moe_ffn_capacity(x.astype(jnp.bfloat16), ids, gates, valid,
                            *(v.astype(jnp.bfloat16) for v in w)).dtype == jnp.bfloat16
    for got, ref, want, name in zip(got16, ref16, exact, ("x", "w_gate", "w_up", "w_down")):
        want = np.asarray(want, np.float32)
        err = np.abs(np.asarray(got, np.float32) - want).max()
        ref_err = np.abs(np.asarray(ref, np.float32) - want).max()
        assert err <= 2 * ref_err + 1e-3 * np.abs(want).max(), (name, err, ref_err)
