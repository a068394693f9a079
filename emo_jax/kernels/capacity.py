"""Expert SwiGLU as three batched matmuls over a per-expert capacity slab, dropless.

Why: on XLA:CPU one large batched `dot` runs near the speed of a dense matmul, while
a loop of small per-block matmuls (`kernels.blocked`) pays a loop iteration, a
dynamic slice and a conditional per block, and `ragged_dot` is lowered densely
(E times the work). Measured at S2's shapes (M = 32768 rows, D = 256, H = 128,
E = 64) in `benchmarks/bench_grouped_matmul.py`; numbers in BUILD_NOTES.md.

Layout: the expert-sorted rows (the `reference.dispatch` layout) are gathered into
a slab [E, C, D], row i of expert e's group at slot (e, i) for i < C. The capacity
C = round_up(capacity_factor * M / E, align) is static. The three matmuls of the
SwiGLU are batched `einsum`s over the slab, so there is no per-block loop at all.

Dropless: rows i >= C of a group (overflow) are not dropped. After the slab, a
`lax.while_loop` whose trip count is the number of overflow blocks (0 in the
common case, so it costs nothing then) runs the SwiGLU over blocks of R overflow
rows, sliced directly out of the sorted buffer, and writes them into the output in
place. Its gradient is the same loop (recomputing the block's forward), so the
forward keeps no per-block residual.

The whole SwiGLU is one custom VJP: residuals are the slab input and the two
hidden pre-activations; the backward is five batched matmuls plus the overflow
loop. Inside `shard_map(check_vma=True)` the weight cotangents are summed over the
axes the weights are replicated on (`compat.psum_to_match`).

Shape letters: M sorted rows (rows past sum(group_sizes) are padding and give 0),
D model width, H expert hidden, E experts, C capacity, R overflow block rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emo_jax import compat
from emo_jax.kernels import reference

Array = jax.Array

DEFAULT_CAPACITY_FACTOR = 1.0
CAPACITY_ALIGN = 8
OVERFLOW_BLOCK_ROWS = 32  # measured at S2 (uniform routing): 32 and 16 beat 64; 16 loses under skew


def capacity_for(rows: int, num_experts: int, capacity_factor: float, align: int = CAPACITY_ALIGN) -> int:
    """Static slab capacity: capacity_factor x the mean rows per expert, rounded up to `align`."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}.")
    mean = -(-rows // num_experts)
    cap = -(-int(capacity_factor * mean + 0.999999) // align) * align
    return max(align, min(cap, -(-rows // align) * align))


class SlabLayout(NamedTuple):
    """Where each sorted row lives: its slab slot, or the overflow path."""

    dest: Array  # i32[M]  slab row e * C + i, or E * C (a sink row) for overflow/padding rows
    slot_row: Array  # i32[E * C]  the sorted row held by each slab slot, or M (none)
    group_start: Array  # i32[E]  first sorted row of each group
    group_sizes: Array  # i32[E]
    overflow_blocks: Array  # i32[E]  ceil(max(size - C, 0) / R)
    overflow_first_block: Array  # i32[E]  exclusive prefix sum of overflow_blocks
    num_overflow_blocks: Array  # i32[]


def slab_layout(group_sizes: Array, rows: int, capacity: int, block_rows: int) -> SlabLayout:
    """group_sizes: i32[E] (sum <= rows) -> the layout of `rows` sorted rows."""
    num_experts = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    end = jnp.cumsum(group_sizes)
    start = end - group_sizes
    row = jnp.arange(rows, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(end, row, side="right"), num_experts - 1).astype(jnp.int32)
    pos = row - start[expert]
    in_slab = (row < end[-1]) & (pos < capacity)
    dest = jnp.where(in_slab, expert * capacity + pos, num_experts * capacity).astype(jnp.int32)
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, :]  # [1, C]
    slot_row = jnp.where(slot < jnp.minimum(group_sizes, capacity)[:, None], start[:, None] + slot, rows)
    over = jnp.maximum(group_sizes - capacity, 0)
    blocks = (over + block_rows - 1) // block_rows
    first = jnp.cumsum(blocks) - blocks
    return SlabLayout(dest, slot_row.reshape(-1).astype(jnp.int32), start, group_sizes, blocks, first, jnp.sum(blocks).astype(jnp.int32))


def _to_slab(x: Array, lay: "SlabLayout", num_experts: int, capacity: int) -> Array:
    """[M, A] -> [E, C, A]; slots without a row are 0. A gather (each slot reads its
    row, `lay.slot_row`), not a scatter of rows: XLA:CPU gathers rows much faster."""
    return x.at[lay.slot_row].get(mode="fill", fill_value=0).reshape(num_experts, capacity, x.shape[-1])


def _from_slab(slab: Array, dest: Array) -> Array:
    """[E, C, A] -> [M, A] in sorted-row order; overflow and padding rows (sink) are 0."""
    flat = slab.reshape(-1, slab.shape[-1])
    return flat.at[dest].get(mode="fill", fill_value=0)


def _bmm(a: Array, b: Array, spec: str, dtype) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def add_at(acc: Array, e: Array, value: Array) -> Array:
    """acc[e] += value for a traced index e, as a dynamic-update-slice: inside a loop
    XLA:CPU updates that in place, where `acc.at[e].add` (a scatter) copied the whole
    accumulator every iteration (measured: ~3 ms per overflow block at S2)."""
    return jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, e, 0, keepdims=False) + value,
                                               e, 0)


def _overflow_block(lay: SlabLayout, capacity: int, block_rows: int, rows: int,
                    j: Array) -> tuple[Array, Array, Array]:
    """Overflow block j -> (its expert, first row of an R-row slice of the sorted
    buffer that holds it, bool[R] the slice's rows that belong to the block).

    The slice starts at the block's first row, or earlier when that would run past
    the end of the buffer (R <= M), so no padded copy of the buffer is needed."""
    num_experts = lay.group_sizes.shape[0]
    e = jnp.minimum(jnp.searchsorted(lay.overflow_first_block + lay.overflow_blocks, j, side="right"),
                    num_experts - 1).astype(jnp.int32)
    first = lay.group_start[e] + capacity + (j - lay.overflow_first_block[e]) * block_rows
    end = jnp.minimum(first + block_rows, lay.group_start[e] + lay.group_sizes[e])
    start = jnp.minimum(first, rows - block_rows)
    row = start + jnp.arange(block_rows, dtype=jnp.int32)
    return e, start, (row >= first) & (row < end)


def _overflow_forward(y: Array, x: Array, w_gate: Array, w_up: Array, w_down: Array, lay: SlabLayout,
                      capacity: int, block_rows: int) -> Array:
    """Writes the SwiGLU of every overflow row into y [M, D] (in place)."""
    rows = x.shape[0]

    def body(j, y):
        e, first, mask = _overflow_block(lay, capacity, block_rows, rows, j)
        x_blk = jax.lax.dynamic_slice_in_dim(x, first, block_rows)
        y_blk = block_swiglu(x_blk, w_gate[e], w_up[e], w_down[e]).astype(y.dtype)
        old = jax.lax.dynamic_slice_in_dim(y, first, block_rows)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(mask[:, None], y_blk, old), first, 0)

    y = compat.vary_like(y, x, w_gate, lay.dest)
    return jax.lax.fori_loop(0, lay.num_overflow_blocks, body, y)


def _overflow_backward(dx: Array, dw: tuple[Array, Array, Array], dy: Array, x: Array, w_gate: Array,
                       w_up: Array, w_down: Array, lay: SlabLayout, capacity: int,
                       block_rows: int) -> tuple[Array, tuple[Array, Array, Array]]:
    """Adds the overflow rows' cotangents: writes dx rows, accumulates the weight
    cotangents (float32) of each block's expert."""
    rows = x.shape[0]

    def body(j, carry):
        dx, (dwg, dwu, dwd) = carry
        e, first, mask = _overflow_block(lay, capacity, block_rows, rows, j)
        x_blk = jax.lax.dynamic_slice_in_dim(x, first, block_rows)
        dy_blk = jnp.where(mask[:, None], jax.lax.dynamic_slice_in_dim(dy, first, block_rows), 0)
        dx_blk, (dwg_e, dwu_e, dwd_e) = block_swiglu_grads(x_blk, dy_blk, w_gate[e], w_up[e], w_down[e])
        dwg, dwu, dwd = add_at(dwg, e, dwg_e), add_at(dwu, e, dwu_e), add_at(dwd, e, dwd_e)
        dx_blk = dx_blk.astype(dx.dtype)
        old = jax.lax.dynamic_slice_in_dim(dx, first, block_rows)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(mask[:, None], dx_blk, old), first, 0)
        return dx, (dwg, dwu, dwd)

    like = (x, dy, w_gate, lay.dest)
    carry = (compat.vary_like(dx, *like), tuple(compat.vary_like(d, *like) for d in dw))
    return jax.lax.fori_loop(0, lay.num_overflow_blocks, body, carry)


def slab_swiglu(xs: Array, w_gate: Array, w_up: Array, w_down: Array) -> tuple[Array, Array, Array]:
    """The SwiGLU of every slab slot: xs [E, C, D] -> (ys [E, C, D], and the hidden
    pre-activations g, u [E, C, H], the residuals of `slab_swiglu_grads`). Empty slots
    (zero rows) give zero outputs."""
    g = _bmm(xs, w_gate, "ecd,edh->ech", xs.dtype)
    u = _bmm(xs, w_up, "ecd,edh->ech", xs.dtype)
    ys = _bmm(jax.nn.silu(g) * u, w_down, "ech,ehd->ecd", xs.dtype)
    return ys, g, u


def _swiglu_hidden_grads(dh: Array, g: Array, u: Array) -> tuple[Array, Array, Array]:
    """float32 cotangents of the gate and up pre-activations from dh = d(silu(g) * u),
    and silu(g) (for h = silu(g) * u)."""
    sg = jax.nn.sigmoid(g)
    silu = g * sg
    return dh * u * sg * (1 + g * (1 - sg)), dh * silu, silu


def slab_swiglu_grads(xs: Array, g: Array, u: Array, dys: Array, w_gate: Array, w_up: Array,
                      w_down: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    """Backward of `slab_swiglu`: five batched matmuls. Returns dxs f32[E, C, D] and the
    weight cotangents f32 (w_gate, w_up, w_down); slots with dys = 0 contribute nothing."""
    f32 = jnp.float32
    g32, u32 = g.astype(f32), u.astype(f32)
    dh = _bmm(dys, w_down, "ecd,ehd->ech", f32)
    dg, du, silu = _swiglu_hidden_grads(dh, g32, u32)
    h = (silu * u32).astype(xs.dtype)
    dg, du = dg.astype(xs.dtype), du.astype(xs.dtype)
    dw_down = _bmm(h, dys, "ech,ecd->ehd", f32)
    dw_gate = _bmm(xs, dg, "ecd,ech->edh", f32)
    dw_up = _bmm(xs, du, "ecd,ech->edh", f32)
    dxs = _bmm(dg, w_gate, "ech,edh->ecd", f32) + _bmm(du, w_up, "ech,edh->ecd", f32)
    return dxs, (dw_gate, dw_up, dw_down)


def block_swiglu(x_blk: Array, w_gate_e: Array, w_up_e: Array, w_down_e: Array) -> Array:
    """One expert's SwiGLU of a block of rows: x_blk [R, D] -> f32[R, D]."""
    g = jnp.dot(x_blk, w_gate_e, preferred_element_type=jnp.float32)
    u = jnp.dot(x_blk, w_up_e, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x_blk.dtype)
    return jnp.dot(h, w_down_e, preferred_element_type=jnp.float32)


def block_swiglu_grads(x_blk: Array, dy_blk: Array, w_gate_e: Array, w_up_e: Array,
                       w_down_e: Array) -> tuple[Array, tuple[Array, Array, Array]]:
    """Backward of `block_swiglu` (recomputing its forward), all in float32: returns
    dx_blk f32[R, D] and the expert's weight cotangents f32 ([D, H], [D, H], [H, D])."""
    f32 = jnp.float32
    x_blk, dy_blk = x_blk.astype(f32), dy_blk.astype(f32)
    wg, wu, wd = (w.astype(f32) for w in (w_gate_e, w_up_e, w_down_e))
    g, u = x_blk @ wg, x_blk @ wu
    dg, du, silu = _swiglu_hidden_grads(dy_blk @ wd.T, g, u)
    dx_blk = dg @ wg.T + du @ wu.T
    return dx_blk, (x_blk.T @ dg, x_blk.T @ du, (silu * u).T @ dy_blk)


def _slab_forward(x, w_gate, w_up, w_down, group_sizes, capacity, block_rows):
    rows = x.shape[0]
    num_experts = w_gate.shape[0]
    lay = slab_layout(group_sizes, rows, capacity, block_rows)
    xs = _to_slab(x, lay, num_experts, capacity)  # [E, C, D]
    ys, g, u = slab_swiglu(xs, w_gate, w_up, w_down)
    y = _from_slab(ys, lay.dest)
    y = _overflow_forward(y, x, w_gate, w_up, w_down, lay, capacity, block_rows)
    return y, (x, xs, g, u, w_gate, w_up, w_down, lay)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _capacity_swiglu(x, w_gate, w_up, w_down, group_sizes, capacity, block_rows):
    return _slab_forward(x, w_gate, w_up, w_down, group_sizes, capacity, block_rows)[0]


def _capacity_swiglu_fwd(x, w_gate, w_up, w_down, group_sizes, capacity, block_rows):
    return _slab_forward(x, w_gate, w_up, w_down, group_sizes, capacity, block_rows)


def _capacity_swiglu_bwd(capacity, block_rows, res, dy):
    x, xs, g, u, w_gate, w_up, w_down, lay = res
    num_experts = w_gate.shape[0]
    dys = _to_slab(dy, lay, num_experts, capacity)  # overflow rows go to the sink
    dxs, (dw_gate, dw_up, dw_down) = slab_swiglu_grads(xs, g, u, dys, w_gate, w_up, w_down)
    dx = _from_slab(dxs.astype(x.dtype), lay.dest)
    dx, (dw_gate, dw_up, dw_down) = _overflow_backward(dx, (dw_gate, dw_up, dw_down), dy, x, w_gate, w_up,
                                                       w_down, lay, capacity, block_rows)
    dws = tuple(compat.psum_to_match(d, w).astype(w.dtype) for d, w in
                ((dw_gate, w_gate), (dw_up, w_up), (dw_down, w_down)))
    return (compat.psum_to_match(dx, x),) + dws + (jnp.zeros(lay.group_sizes.shape, jax.dtypes.float0),)


_capacity_swiglu.defvjp(_capacity_swiglu_fwd, _capacity_swiglu_bwd)


def grouped_swiglu_capacity(x_sorted: Array, w_gate: Array, w_up: Array, w_down: Array, group_sizes: Array,
                            capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
                            block_rows: int = OVERFLOW_BLOCK_ROWS, expected_rows: int | None = None) -> Array:
    """Same contract as `reference.grouped_swiglu`: x_sorted [M, D] grouped by
    group_sizes i32[E]; w_gate, w_up [E, D, H], w_down [E, H, D] -> [M, D]; rows past
    sum(group_sizes) give 0. Dropless whatever the capacity factor.

    expected_rows: the rows the capacity is sized for (default M); a buffer that is
    mostly empty by construction (the expert-parallel receive buffer) passes its
    expected fill, so the slab is not sized for the worst case."""
    rows = x_sorted.shape[0]
    num_experts = w_gate.shape[0]
    capacity = capacity_for(min(rows, expected_rows or rows), num_experts, capacity_factor)
    block_rows = max(1, min(block_rows, rows))
    return _capacity_swiglu(x_sorted, w_gate, w_up, w_down, group_sizes.astype(jnp.int32), capacity, block_rows)


def moe_ffn_capacity(x: Array, expert_ids: Array, gates: Array, valid: Array, w_gate: Array, w_up: Array,
                     w_down: Array, capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
                     expected_rows: int | None = None) -> Array:
    """`reference.moe_ffn` with the SwiGLU of `grouped_swiglu_capacity` (reference
    dispatch and combine)."""
    d = reference.dispatch(x, expert_ids, valid, w_gate.shape[0])
    y_sorted = grouped_swiglu_capacity(d.x_sorted, w_gate, w_up, w_down, d.group_sizes, capacity_factor,
                                       expected_rows=expected_rows)
    return reference.combine(y_sorted, d.order, d.valid_sorted, gates)
