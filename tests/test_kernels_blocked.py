"""The `blocked` grouped matmul (the CPU default backend) against the reference
(`jax.lax.ragged_dot`): values and both gradients, for empty groups, padding rows past
the groups, blocks smaller and larger than the groups, and the whole dropless layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import kernels
from emo_jax.kernels.blocked import grouped_matmul_blocked
from emo_jax.kernels.reference import grouped_matmul
from moe_layer_check import assert_layer_matches_reference  # noqa: E402

# float32 with the conftest's "highest" matmul precision: the two backends sum the same
# products in a different order, so they agree to rounding, not bitwise.
TOL = dict(rtol=2e-5, atol=2e-5)


def _problem(seed: int, rows: int, a: int, b: int, group_sizes: list[int]):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(rows, a)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(len(group_sizes), a, b)) / np.sqrt(a), jnp.float32)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)


CASES = [
    # rows, a, b, group sizes (sum <= rows: the rest is padding), block rows
    (64, 16, 8, [10, 0, 30, 24], 8),      # an empty group, blocks smaller than groups
    (64, 16, 8, [10, 0, 30, 4], 8),       # 20 padding rows at the end must give 0
    (50, 8, 12, [50, 0, 0, 0, 0], 128),   # one group, block larger than all rows
    (37, 8, 8, [1, 1, 1, 30, 0, 4], 4),   # odd sizes, several tiny groups
    (16, 4, 4, [0, 0, 0, 0], 8),          # no real row at all
]


@pytest.mark.parametrize("rows, a, b, sizes, block", CASES)
def test_blocked_matches_ragged_dot_values_and_gradients(rows, a, b, sizes, block):
    lhs, rhs, group_sizes = _problem(rows + a, rows, a, b, sizes)
    got = grouped_matmul_blocked(lhs, rhs, group_sizes, block_rows=block)
    want = grouped_matmul(lhs, rhs, group_sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    real = int(sum(sizes))
    assert not np.any(np.asarray(got)[real:]), "rows past sum(group_sizes) must be 0"

    probe = jnp.asarray(np.random.default_rng(1).normal(size=(rows, b)), jnp.float32)

    def loss(fn, x, w):
        return jnp.sum(fn(x, w, group_sizes) * probe)

    blocked = jax.jit(jax.grad(lambda x, w: loss(lambda *args: grouped_matmul_blocked(*args, block_rows=block), x, w),
                               argnums=(0, 1)))(lhs, rhs)
    reference = jax.jit(jax.grad(lambda x, w: loss(grouped_matmul, x, w), argnums=(0, 1)))(lhs, rhs)
    for g_blocked, g_reference, name in zip(blocked, reference, ("d lhs", "d rhs")):
        np.testing.assert_allclose(np.asarray(g_blocked), np.asarray(g_reference), err_msg=name, **TOL)


def test_blocked_jits_once_for_any_grouping():
    """Group sizes are data, not shapes: one compiled program serves every routing."""
    lhs, rhs, _ = _problem(0, 32, 8, 8, [8, 8, 8, 8])
    f = jax.jit(lambda x, w, g: grouped_matmul_blocked(x, w, g, block_rows=8))
    for sizes in ([32, 0, 0, 0], [0, 0, 0, 32], [5, 7, 11, 9], [1, 2, 3, 4]):
        g = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(np.asarray(f(lhs, rhs, g)), np.asarray(grouped_matmul(lhs, rhs, g)), **TOL)
    assert f._cache_size() == 1


def test_blocked_backend_layer_matches_reference_layer():
    """The whole dropless SwiGLU layer (dispatch, three grouped matmuls, combine), with
    padding tokens and the gradient of every input."""
    blocked = kernels.backend_for("blocked")
    assert blocked.name == "blocked"
    assert_layer_matches_reference(blocked.moe_ffn, **TOL)
