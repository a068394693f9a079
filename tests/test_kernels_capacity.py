"""The `capacity` expert SwiGLU (the CPU default backend) against the reference
(three `jax.lax.ragged_dot`): values and the gradients w.r.t. the rows and the three
weights, with and without overflow past the capacity, empty groups, padding rows, and
the whole dropless layer. Inside shard_map it is covered by tests/test_parallel_moe.py
(the expert-parallel layer's default backend on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import kernels
from emo_jax.kernels.capacity import capacity_for, grouped_swiglu_capacity, slab_layout
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
    lay = slab_layout(jnp.asarray([10, 0, 30, 24], jnp.int32), 64, 16, 8)
    np.testing.assert_array_equal(np.asarray(lay.overflow_blocks), [0, 0, 2, 1])
    assert int(lay.num_overflow_blocks) == 3
    dest = np.asarray(lay.dest)
    assert (dest == 4 * 16).sum() == 14 + 8  # the overflow rows go to the sink, not into the slab


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
