"""Dropless MoE feed-forward over a per-expert capacity slab: the CPU default backend.

Why: on XLA:CPU one large batched `dot` runs near the speed of a dense matmul, where
a loop of small per-block matmuls (`kernels.blocked`) pays a loop iteration, a dynamic
slice and a conditional per block, and `ragged_dot` is lowered densely (E times the
work). Measured in `benchmarks/bench_grouped_matmul.py` and
`benchmarks/bench_cpu_parts.py`; numbers in BUILD_NOTES.md.

Layout (`SlabPlan`): the T*K token copies are put in expert order
(`reference.sort_copies`), and expert e's first C copies fill slab rows e*C .. e*C+C-1.
The capacity C = round_up(capacity_factor * M / E, 8) is static. The slab is gathered
straight from the token rows, the SwiGLU is three batched einsums over it, and the
combine gathers each copy's output straight from the slab and sums the K copies with
their gates. No [M, D] expert-sorted buffer is built: one row gather in, one out
(docs/kernels.md, "The capacity backend").

Dropless: copies past C in their group (overflow) are not dropped. After the slab, one
`lax.fori_loop` per overflow block size (`default_block_sizes`), each with a traced
trip count (0 when nothing overflows), runs the SwiGLU over blocks of R overflow
copies, gathering their token rows, and scatter-adds gate * output into the token
output in place. Their gradient is the same loops (recomputing each block's forward),
so the forward keeps no per-block residual.

The whole layer is one custom VJP. Residuals: the slab input, the two hidden
pre-activations and the slab output (for the gate gradient). The backward gathers
the output cotangent into the slab, runs five batched matmuls, gathers the input
cotangent of every copy and sums each token's K copies, and runs the overflow loop.
Inside `shard_map(check_vma=True)` the weight cotangents are summed over the axes the
weights are replicated on (`compat.psum_to_match`).

`grouped_swiglu_capacity` is the same computation for rows already grouped by expert
(the `reference.grouped_swiglu` contract): one copy per row, weight 1.

Shape letters: T tokens (rows), K copies per token, M = T * K copies, D model width,
H expert hidden, E experts, C capacity, S = E * C slab slots, R overflow block rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import compat
from emo_jax.kernels import reference

Array = jax.Array

DEFAULT_CAPACITY_FACTOR = 1.0
CAPACITY_ALIGN = 8
# Overflow block sizes, largest first: each expert's overflow goes in blocks of 512 rows
# while at least 512 remain, then at most one block each of 256, 128 and 64, then
# blocks of 32. In a loop XLA:CPU multiplies a 32-row block at about 62 GFLOP/s and a
# 512-row one at about 126 (the slab: 158), while a 32-row block wastes at most 31
# rows on an expert that overflows by a few (`benchmarks/bench_cpu_parts.py --sections
# overflow`; under skewed routing at S2 the SwiGLU with gradients takes 2.2x a dense one
# with these sizes against 3.2x with 32-row blocks only: `bench_grouped_matmul.py`).
OVERFLOW_BLOCK_ROWS = (512, 256, 128, 64, 32)
# By default a size above the smallest is kept only where the problem holds at least this
# many blocks of it. Every size is one forward and one backward loop to compile: at
# configs/tiny.yaml (3072 copies) the sizes 512 and 256 cost about 1.1 s of each train
# step's tracing and compile (compile 6.0 s against 5.1-5.3 s, tracing 0.25 s) and
# nothing measurable at run time (BUILD_NOTES.md, "Ninth session"). Issue 16's S1 and S2
# and the reproduction's 12288 copies keep every size.
MIN_BLOCKS_PER_SIZE = 24


def default_block_sizes(rows: int) -> tuple[int, ...]:
    """OVERFLOW_BLOCK_ROWS without the sizes that `rows` copies hold fewer than
    MIN_BLOCKS_PER_SIZE blocks of; the smallest size is always kept."""
    return tuple(r for r in OVERFLOW_BLOCK_ROWS[:-1] if r * MIN_BLOCKS_PER_SIZE <= rows) + OVERFLOW_BLOCK_ROWS[-1:]


def capacity_for(rows: int, num_experts: int, capacity_factor: float, align: int = CAPACITY_ALIGN) -> int:
    """Static slab capacity: capacity_factor x the mean rows per expert, rounded up to `align`."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}.")
    mean = -(-rows // num_experts)
    cap = -(-int(capacity_factor * mean + 0.999999) // align) * align
    return max(align, min(cap, -(-rows // align) * align))


class SlabPlan(NamedTuple):
    """Where every token copy goes: its slab slot, or the overflow loop. Integers only."""

    order: Array  # i32[M]  copy (t * K + j) at each expert-sorted position; padding copies last
    slot_copy: Array  # i32[S]  copy held by each slot, or M (an empty slot)
    copy_slot: Array  # i32[M]  slot of each copy, or S (overflow and padding copies)
    overflow: tuple["OverflowTier", ...]  # one per overflow block size, largest first


class OverflowTier(NamedTuple):
    """The overflow copies one block size serves: expert e's sorted positions
    first[e] .. first[e] + rows[e] - 1, in blocks of R (the last one may be partial)."""

    first: Array  # i32[E]  first sorted position of the tier's rows of each expert
    rows: Array  # i32[E]
    blocks: Array  # i32[E]  ceil(rows / R)
    first_block: Array  # i32[E]  exclusive prefix sum of blocks
    num_blocks: Array  # i32[]


def overflow_block_sizes(block_rows: int | tuple[int, ...], copies: int) -> tuple[int, ...]:
    """The static overflow block sizes, largest first, none above `copies` (>= 1)."""
    sizes = (block_rows,) if isinstance(block_rows, int) else tuple(block_rows)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"overflow block sizes must be positive, got {block_rows}.")
    return tuple(sorted({max(1, min(r, copies)) for r in sizes}, reverse=True))


def _plan(order: Array, group_sizes: Array, capacity: int, block_sizes: tuple[int, ...]) -> SlabPlan:
    """order: i32[M] copies in expert order (the real ones first, sum(group_sizes) of
    them); group_sizes: i32[E]."""
    m = order.shape[0]
    num_experts = group_sizes.shape[0]
    slots = num_experts * capacity
    group_sizes = group_sizes.astype(jnp.int32)
    end = jnp.cumsum(group_sizes)
    start = end - group_sizes
    pos = jnp.arange(m, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(end, pos, side="right"), num_experts - 1).astype(jnp.int32)
    rank = pos - start[expert]
    in_slab = (pos < end[-1]) & (rank < capacity)
    slot_of_pos = jnp.where(in_slab, expert * capacity + rank, slots).astype(jnp.int32)
    copy_slot = jnp.zeros((m,), jnp.int32).at[order].set(slot_of_pos, unique_indices=True)
    c = jnp.arange(capacity, dtype=jnp.int32)[None, :]  # [1, C]
    slot_pos = jnp.where(c < jnp.minimum(group_sizes, capacity)[:, None], start[:, None] + c, m)  # [E, C]
    slot_copy = order.at[slot_pos.reshape(-1)].get(mode="fill", fill_value=m).astype(jnp.int32)
    return SlabPlan(order.astype(jnp.int32), slot_copy, copy_slot,
                    _overflow_tiers(start + capacity, jnp.maximum(group_sizes - capacity, 0), block_sizes))


def _overflow_tiers(first: Array, rows: Array, block_sizes: tuple[int, ...]) -> tuple[OverflowTier, ...]:
    """Splits each expert's overflow rows [first, first + rows) over the block sizes:
    whole blocks of each size but the last, the remainder in blocks of the last."""
    tiers = []
    for i, size in enumerate(block_sizes):
        take = rows if i == len(block_sizes) - 1 else rows // size * size
        blocks = (take + size - 1) // size
        tiers.append(OverflowTier(first, take, blocks, jnp.cumsum(blocks) - blocks, jnp.sum(blocks).astype(jnp.int32)))
        first, rows = first + take, rows - take
    return tuple(tiers)


def plan_for_copies(expert_ids: Array, valid: Array, num_experts: int, capacity: int,
                    block_sizes: tuple[int, ...]) -> SlabPlan:
    """The plan of T*K token copies. expert_ids: i32[T, K]; valid: bool[T] (padding
    tokens' copies go nowhere)."""
    order, group_sizes, _ = reference.sort_copies(expert_ids, valid, num_experts)
    return _plan(order, group_sizes, capacity, block_sizes)


def plan_for_sorted_rows(group_sizes: Array, rows: int, capacity: int, block_sizes: tuple[int, ...]) -> SlabPlan:
    """The plan of `rows` rows already grouped by expert (row i is copy i, K = 1); rows
    past sum(group_sizes) are padding."""
    return _plan(jnp.arange(rows, dtype=jnp.int32), group_sizes, capacity, block_sizes)


def _bmm(a: Array, b: Array, spec: str, dtype) -> Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


def add_at(acc: Array, e: Array, value: Array) -> Array:
    """acc[e] += value for a traced index e, as a dynamic-update-slice: inside a loop
    XLA:CPU updates that in place, where `acc.at[e].add` (a scatter) copied the whole
    accumulator every iteration (measured: ~3 ms per overflow block at S2)."""
    return jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, e, 0, keepdims=False) + value,
                                               e, 0)


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


def block_swiglu_grads(x_blk: Array, dy_blk: Array, w_gate_e: Array, w_up_e: Array, w_down_e: Array,
                       with_output: bool = False) -> tuple[Array | None, Array, tuple[Array, Array, Array]]:
    """Backward of `block_swiglu` (recomputing its forward), all in float32: returns
    the block's output f32[R, D] (with_output, else None), dx_blk f32[R, D] and the
    expert's weight cotangents f32 ([D, H], [D, H], [H, D])."""
    f32 = jnp.float32
    x_blk, dy_blk = x_blk.astype(f32), dy_blk.astype(f32)
    wg, wu, wd = (w.astype(f32) for w in (w_gate_e, w_up_e, w_down_e))
    g, u = x_blk @ wg, x_blk @ wu
    dg, du, silu = _swiglu_hidden_grads(dy_blk @ wd.T, g, u)
    h = silu * u
    dx_blk = dg @ wg.T + du @ wu.T
    return (h @ wd if with_output else None), dx_blk, (x_blk.T @ dg, x_blk.T @ du, h.T @ dy_blk)


def _overflow_block(tier: OverflowTier, order: Array, block_rows: int, j: Array) -> tuple[Array, Array, Array]:
    """Block j of a tier -> (its expert, the copies i32[R] at R consecutive sorted
    positions that hold it, bool[R] which of them belong to the block).

    The positions start at the block's first one, or earlier when that would run past
    the end (R <= M), so no padded copy of `order` is needed."""
    m = order.shape[0]
    num_experts = tier.first.shape[0]
    e = jnp.minimum(jnp.searchsorted(tier.first_block + tier.blocks, j, side="right"),
                    num_experts - 1).astype(jnp.int32)
    first = tier.first[e] + (j - tier.first_block[e]) * block_rows
    end = jnp.minimum(first + block_rows, tier.first[e] + tier.rows[e])
    begin = jnp.minimum(first, m - block_rows)
    pos = begin + jnp.arange(block_rows, dtype=jnp.int32)
    return e, jax.lax.dynamic_slice_in_dim(order, begin, block_rows), (pos >= first) & (pos < end)


def _block_rows(a: Array, token: Array, mask: Array) -> Array:
    """Rows a[token] of a block, zero where the block's mask is off ([T, D] -> [R, D]):
    the unmasked positions may hold other experts' or padding tokens' copies."""
    return jnp.where(mask[:, None], a[token], 0)


def _overflow_forward(y: Array, x: Array, gates: Array | None, w_gate: Array, w_up: Array, w_down: Array,
                      plan: SlabPlan, block_sizes: tuple[int, ...]) -> Array:
    """Adds gate * SwiGLU of every overflow copy into its token's row of y f32[T, D]
    (in place), one loop per block size. gates: f32[M] or None (weight 1)."""
    tokens = x.shape[0]
    k = plan.order.shape[0] // tokens

    def body(tier, block_rows, j, y):
        e, copies, mask = _overflow_block(tier, plan.order, block_rows, j)
        token = copies // k
        x_blk = _block_rows(x, token, mask)
        # Rounded to x's dtype like the slab's outputs, before the gate.
        y_blk = block_swiglu(x_blk, w_gate[e], w_up[e], w_down[e]).astype(x.dtype).astype(jnp.float32)
        if gates is not None:
            y_blk = y_blk * gates[copies][:, None]
        return y.at[jnp.where(mask, token, tokens)].add(y_blk, mode="drop")

    y = compat.vary_like(y, x, w_gate, plan.order, *(() if gates is None else (gates,)))
    for tier, block_rows in zip(plan.overflow, block_sizes):
        y = jax.lax.fori_loop(0, tier.num_blocks, functools.partial(body, tier, block_rows), y)
    return y


def _overflow_backward(dx: Array, d_gates: Array | None, dw: tuple[Array, Array, Array], dy: Array, x: Array,
                       gates: Array | None, w_gate: Array, w_up: Array, w_down: Array, plan: SlabPlan,
                       block_sizes: tuple[int, ...]):
    """Adds the overflow copies' cotangents: into their tokens' rows of dx f32[T, D],
    their entries of d_gates f32[M], and their experts' weight cotangents (float32)."""
    tokens = x.shape[0]
    m = plan.order.shape[0]
    k = m // tokens

    def body(tier, block_rows, j, carry):
        dx, d_gates, (dwg, dwu, dwd) = carry
        e, copies, mask = _overflow_block(tier, plan.order, block_rows, j)
        token = copies // k
        x_blk, dy_blk = _block_rows(x, token, mask), _block_rows(dy, token, mask)
        gate = None if gates is None else jnp.where(mask, gates[copies], 0)
        y_blk, dx_blk, (dwg_e, dwu_e, dwd_e) = block_swiglu_grads(
            x_blk, dy_blk if gate is None else dy_blk * gate[:, None], w_gate[e], w_up[e], w_down[e],
            with_output=gate is not None)
        if gate is not None:
            d_gates = d_gates.at[jnp.where(mask, copies, m)].set(jnp.sum(y_blk * dy_blk, axis=-1), mode="drop")
        dx = dx.at[jnp.where(mask, token, tokens)].add(dx_blk, mode="drop")
        return dx, d_gates, (add_at(dwg, e, dwg_e), add_at(dwu, e, dwu_e), add_at(dwd, e, dwd_e))

    like = (x, dy, w_gate, plan.order) + (() if gates is None else (gates,))
    carry = (compat.vary_like(dx, *like), None if d_gates is None else compat.vary_like(d_gates, *like),
             tuple(compat.vary_like(d, *like) for d in dw))
    for tier, block_rows in zip(plan.overflow, block_sizes):
        carry = jax.lax.fori_loop(0, tier.num_blocks, functools.partial(body, tier, block_rows), carry)
    return carry


def _forward(x, gates, w_gate, w_up, w_down, plan, capacity, block_sizes):
    tokens, d = x.shape
    num_experts = w_gate.shape[0]
    k = plan.order.shape[0] // tokens
    xs = x.at[plan.slot_copy // k].get(mode="fill", fill_value=0).reshape(num_experts, capacity, d)
    ys, g, u = slab_swiglu(xs, w_gate, w_up, w_down)  # [E, C, D]
    y_copies = ys.reshape(-1, d).at[plan.copy_slot].get(mode="fill", fill_value=0).reshape(tokens, k, d)
    gates32 = None if gates is None else gates.reshape(-1).astype(jnp.float32)
    if gates is None:
        y = jnp.sum(y_copies.astype(jnp.float32), axis=1)
    else:
        y = jnp.einsum("tkd,tk->td", y_copies.astype(jnp.float32), gates32.reshape(tokens, k))
    y = _overflow_forward(y, x, gates32, w_gate, w_up, w_down, plan, block_sizes)
    return y.astype(x.dtype), (x, gates, xs, g, u, ys, w_gate, w_up, w_down, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _slab_moe(x, gates, w_gate, w_up, w_down, plan, capacity, block_sizes):
    return _forward(x, gates, w_gate, w_up, w_down, plan, capacity, block_sizes)[0]


def _slab_moe_fwd(x, gates, w_gate, w_up, w_down, plan, capacity, block_sizes):
    return _forward(x, gates, w_gate, w_up, w_down, plan, capacity, block_sizes)


def _slab_moe_bwd(capacity, block_sizes, res, dy):
    x, gates, xs, g, u, ys, w_gate, w_up, w_down, plan = res
    tokens, d = x.shape
    num_experts = w_gate.shape[0]
    m = plan.order.shape[0]
    k = m // tokens
    f32 = jnp.float32
    dy = dy.astype(f32)
    dy_slots = dy.at[plan.slot_copy // k].get(mode="fill", fill_value=0)  # [S, D]
    gates32 = None if gates is None else gates.reshape(-1).astype(f32)
    if gates is None:
        dys, d_gates = dy_slots, None
    else:
        dys = dy_slots * gates32.at[plan.slot_copy].get(mode="fill", fill_value=0)[:, None]
        slot_d_gate = jnp.sum(ys.reshape(-1, d).astype(f32) * dy_slots, axis=-1)  # [S]
        d_gates = slot_d_gate.at[plan.copy_slot].get(mode="fill", fill_value=0)  # [M]
    dxs, dw = slab_swiglu_grads(xs, g, u, dys.astype(x.dtype).reshape(num_experts, capacity, d),
                                w_gate, w_up, w_down)
    dx = jnp.sum(dxs.reshape(-1, d).at[plan.copy_slot].get(mode="fill", fill_value=0).reshape(tokens, k, d),
                 axis=1)
    dx, d_gates, dw = _overflow_backward(dx, d_gates, dw, dy, x, gates32, w_gate, w_up, w_down, plan,
                                         block_sizes)
    dws = tuple(compat.psum_to_match(dw_i, w).astype(w.dtype) for dw_i, w in zip(dw, (w_gate, w_up, w_down)))
    d_gates = None if gates is None else compat.psum_to_match(d_gates.reshape(gates.shape), gates).astype(gates.dtype)
    no_cotangent = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), plan)  # integers
    return (compat.psum_to_match(dx, x).astype(x.dtype), d_gates) + dws + (no_cotangent,)


_slab_moe.defvjp(_slab_moe_fwd, _slab_moe_bwd)


def _static_sizes(copies: int, num_experts: int, capacity_factor: float, expected_rows: int | None,
                  block_rows: int | tuple[int, ...] | None) -> tuple[int, tuple[int, ...]]:
    """(capacity C, overflow block sizes) for `copies` copies, C and the default block
    sizes (block_rows None) chosen for min(copies, expected_rows)."""
    rows = min(copies, expected_rows or copies)
    sizes = default_block_sizes(rows) if block_rows is None else block_rows
    return capacity_for(rows, num_experts, capacity_factor), overflow_block_sizes(sizes, copies)


def moe_ffn_capacity(x: Array, expert_ids: Array, gates: Array, valid: Array, w_gate: Array, w_up: Array,
                     w_down: Array, capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
                     expected_rows: int | None = None,
                     block_rows: int | tuple[int, ...] | None = None) -> Array:
    """Same contract as `reference.moe_ffn`: x [T, D]; expert_ids i32[T, K]; gates
    f32[T, K]; valid bool[T]; w_gate, w_up [E, D, H], w_down [E, H, D] -> [T, D],
    dropless whatever the capacity factor; padding tokens give 0.

    expected_rows: the copies the capacity is sized for (default T * K); a buffer that
    is mostly empty by construction (the expert-parallel receive buffer) passes its
    expected fill, so the slab is not sized for the worst case. block_rows: the overflow
    block sizes; None = `default_block_sizes` of that many copies."""
    num_experts = w_gate.shape[0]
    capacity, block_sizes = _static_sizes(expert_ids.size, num_experts, capacity_factor, expected_rows, block_rows)
    plan = plan_for_copies(expert_ids, valid, num_experts, capacity, block_sizes)
    return _slab_moe(x, gates, w_gate, w_up, w_down, plan, capacity, block_sizes)


def grouped_swiglu_capacity(x_sorted: Array, w_gate: Array, w_up: Array, w_down: Array, group_sizes: Array,
                            capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
                            block_rows: int | tuple[int, ...] | None = None,
                            expected_rows: int | None = None) -> Array:
    """Same contract as `reference.grouped_swiglu`: x_sorted [M, D] grouped by
    group_sizes i32[E]; w_gate, w_up [E, D, H], w_down [E, H, D] -> [M, D]; rows past
    sum(group_sizes) give 0. Dropless whatever the capacity factor."""
    rows = x_sorted.shape[0]
    num_experts = w_gate.shape[0]
    capacity, block_sizes = _static_sizes(rows, num_experts, capacity_factor, expected_rows, block_rows)
    plan = plan_for_sorted_rows(group_sizes, rows, capacity, block_sizes)
    return _slab_moe(x_sorted, None, w_gate, w_up, w_down, plan, capacity, block_sizes)
