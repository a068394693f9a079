"""The routed-expert FFN with dispatch straight into the capacity slab and combine
straight out of it: tokens -> slab -> tokens, no expert-sorted [M, D] buffer.

Why: with reference dispatch and combine around the sorted-rows slab SwiGLU
(`capacity.grouped_swiglu_capacity`) every row is copied four times per direction
besides the matmuls: dispatch
gathers the token copies into an expert-sorted buffer [M, D], the slab gathers them
again into [E, C, D], the slab's output is gathered back into sorted order [M, D] and
combine scatters that into copy order. Here the slab reads the tokens directly (one
gather of E*C rows from [T, D]) and combine reads the slab directly (one gather of M
rows into [T, K, D], then the gate-weighted sum), and the backward does the same with
gathers only (no scatter-add into [T, D], which XLA:CPU runs row by row). The matmuls
are `capacity.slab_swiglu` / `slab_swiglu_grads`, so the grouped matmul is three
batched einsums over the slab. Measured in `benchmarks/bench_grouped_matmul.py`.

Dropless: a copy that lands past its expert's capacity C (overflow) is computed in a
`lax.fori_loop` over blocks of R overflow rows (trip count 0 when nothing
overflows): each block gathers its rows' tokens from x, runs the expert's SwiGLU and
scatters the results into the copy-order output; its backward recomputes the block
and scatter-adds the block's R rows of dx.

Shape letters: T tokens, D model width, H expert hidden, E experts, K routed experts
per token, M = T*K copies, C capacity, R overflow block rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from emo_jax import compat
from emo_jax.kernels import capacity as cap
from emo_jax.kernels import reference

Array = jax.Array


class TokenSlab(NamedTuple):
    """Where every token copy goes: its slab slot, or the overflow path."""

    layout: cap.SlabLayout  # the expert-sorted layout (sizes, overflow blocks)
    sorted_copy: Array  # i32[M]  copy t*K + j of each expert-sorted row
    slot_copy: Array  # i32[E*C]  the copy held by each slot, or M (empty)
    copy_slot: Array  # i32[M]  each copy's slot, or E*C (overflow or padding: not in the slab)


def token_slab(expert_ids: Array, valid: Array, num_experts: int, capacity: int, block_rows: int) -> TokenSlab:
    """expert_ids i32[T, K], valid bool[T] -> the slab layout of the T*K copies
    (padding copies belong to no expert and are never computed)."""
    copies = expert_ids.size
    order, group_sizes, _ = reference.sort_copies(expert_ids, valid, num_experts)
    lay = cap.slab_layout(group_sizes, copies, capacity, block_rows)
    slot_copy = jnp.asarray(order).at[lay.slot_row].get(mode="fill", fill_value=copies)
    copy_slot = jnp.zeros((copies,), jnp.int32).at[order].set(lay.dest, unique_indices=True)
    return TokenSlab(lay, order, slot_copy, copy_slot)


def _rows(a: Array, index: Array) -> Array:
    """a [N, X] at `index` i32[...]; indices out of range read 0."""
    return a.at[index].get(mode="fill", fill_value=0)


def _overflow_copies(ts: TokenSlab, capacity: int, block_rows: int, j: Array) -> tuple[Array, Array, Array]:
    """Overflow block j -> (its expert, the copies i32[R] of its R-row slice of the
    sorted order, bool[R] which of them belong to the block)."""
    rows = ts.sorted_copy.shape[0]
    e, first, mask = cap._overflow_block(ts.layout, capacity, block_rows, rows, j)
    return e, jax.lax.dynamic_slice_in_dim(ts.sorted_copy, first, block_rows), mask


def _combine_slab(ys: Array, copy_slot: Array, weights: Array) -> Array:
    """sum_j weights[t, j] * ys[slot of copy (t, j)]: ys [E, C, D], weights f32[T, K]
    -> f32[T, D]; copies outside the slab (overflow, padding) contribute 0."""
    tokens, k = weights.shape
    rows = _rows(ys.reshape(-1, ys.shape[-1]), copy_slot).reshape(tokens, k, -1)  # [T, K, D]
    return jnp.einsum("tkd,tk->td", rows.astype(jnp.float32), weights)


def _forward(x, gates, w_gate, w_up, w_down, ts: TokenSlab, capacity: int, block_rows: int):
    """-> (y [T, D], residuals xs [E, C, D], g, u [E, C, H], ys [E, C, D])."""
    tokens, k = gates.shape
    num_experts = w_gate.shape[0]
    xs = _rows(x, ts.slot_copy // k).reshape(num_experts, capacity, -1)  # [E, C, D]; empty slots 0
    ys, g, u = cap.slab_swiglu(xs, w_gate, w_up, w_down)
    gates32 = gates.astype(jnp.float32)
    y = _combine_slab(ys, ts.copy_slot, gates32)

    # Overflow copies add gate * output to their token's row: the loop carries a [T, D]
    # buffer, so the slab path above stays one gather feeding the weighted sum.
    def overflow(j, y):
        e, copy, mask = _overflow_copies(ts, capacity, block_rows, j)
        y_blk = cap.block_swiglu(x[copy // k], w_gate[e], w_up[e], w_down[e])
        weight = jnp.where(mask, gates32.reshape(-1)[copy], 0)
        return y.at[copy // k].add(weight[:, None] * y_blk)

    y = jax.lax.fori_loop(0, ts.layout.num_overflow_blocks, overflow, compat.vary_like(y, x, w_gate, ts.copy_slot))
    return y.astype(x.dtype), (xs, g, u, ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _slab_ffn(x, gates, w_gate, w_up, w_down, ts, capacity, block_rows):
    return _forward(x, gates, w_gate, w_up, w_down, ts, capacity, block_rows)[0]


def _slab_ffn_fwd(x, gates, w_gate, w_up, w_down, ts, capacity, block_rows):
    y, slab = _forward(x, gates, w_gate, w_up, w_down, ts, capacity, block_rows)
    return y, (x, gates, w_gate, w_up, w_down, ts) + slab


def _slab_ffn_bwd(capacity, block_rows, res, dy):
    x, gates, w_gate, w_up, w_down, ts, xs, g, u, ys = res
    tokens, k = gates.shape
    f32 = jnp.float32
    dy32 = dy.astype(f32)
    # d gate (t, j) = <dy_t, output of copy (t, j)>: the slab copies here, overflow below.
    d_gates = jnp.einsum("tkd,td->tk", _rows(ys.reshape(-1, ys.shape[-1]), ts.copy_slot).reshape(tokens, k, -1)
                         .astype(f32), dy32)
    # Each slot's output cotangent: its copy's gate times its token's dy.
    slot_gate = _rows(gates.reshape(-1), ts.slot_copy).astype(f32)  # [E*C]; empty slots 0
    dys = (slot_gate[:, None] * _rows(dy32, ts.slot_copy // k)).astype(x.dtype).reshape(xs.shape)
    dxs, dws = cap.slab_swiglu_grads(xs, g, u, dys, w_gate, w_up, w_down)
    # dx of a token: the sum of its K copies' slab rows (a gather, not a scatter-add).
    dx = jnp.sum(_rows(dxs.reshape(-1, dxs.shape[-1]), ts.copy_slot).reshape(tokens, k, -1), axis=1)

    def overflow(j, carry):
        dx, d_gates, (dwg, dwu, dwd) = carry
        e, copy, mask = _overflow_copies(ts, capacity, block_rows, j)
        token = copy // k
        x_blk, dy_blk = x[token], jnp.where(mask[:, None], dy32[token], 0)
        y_blk = cap.block_swiglu(x_blk, w_gate[e], w_up[e], w_down[e])
        d_gates = d_gates.at[copy].add(jnp.sum(y_blk * dy_blk, axis=-1))
        gate = gates.reshape(-1)[copy][:, None].astype(f32)
        dx_blk, (dwg_e, dwu_e, dwd_e) = cap.block_swiglu_grads(x_blk, gate * dy_blk, w_gate[e], w_up[e], w_down[e])
        dx = dx.at[token].add(jnp.where(mask[:, None], dx_blk, 0))
        return dx, d_gates, (cap.add_at(dwg, e, dwg_e), cap.add_at(dwu, e, dwu_e), cap.add_at(dwd, e, dwd_e))

    like = (x, dy, w_gate, ts.copy_slot)
    carry = (dx, d_gates.reshape(-1), dws)
    dx, d_gates, dws = jax.lax.fori_loop(0, ts.layout.num_overflow_blocks, overflow,
                                         jax.tree.map(lambda a: compat.vary_like(a, *like), carry))
    dws = tuple(compat.psum_to_match(d, w).astype(w.dtype) for d, w in zip(dws, (w_gate, w_up, w_down)))
    ts_zero = jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), ts)
    d_gates = compat.psum_to_match(d_gates.reshape(tokens, k), gates).astype(gates.dtype)
    return (compat.psum_to_match(dx, x).astype(x.dtype), d_gates, *dws, ts_zero)


_slab_ffn.defvjp(_slab_ffn_fwd, _slab_ffn_bwd)


def moe_ffn_slab(x: Array, expert_ids: Array, gates: Array, valid: Array, w_gate: Array, w_up: Array,
                 w_down: Array, capacity_factor: float = cap.DEFAULT_CAPACITY_FACTOR,
                 block_rows: int = cap.OVERFLOW_BLOCK_ROWS, expected_rows: int | None = None) -> Array:
    """Same contract as `reference.moe_ffn`: y_t = sum_j gates[t, j] E_{ids[t, j]}(x_t),
    dropless, padding tokens give 0 (their copies are never computed, so nothing in
    them can leak).

    x: [T, D]; expert_ids: i32[T, K]; gates: f32[T, K]; valid: bool[T]; w_gate, w_up
    [E, D, H]; w_down [E, H, D]. The slab holds capacity_factor x M / E rows per
    expert (a speed knob: copies past it take the overflow loop, none is dropped).
    expected_rows: the copies the slab is sized for (default M); a buffer that is
    mostly padding by construction (the expert-parallel receive buffer) passes its
    expected fill.
    """
    copies = expert_ids.size
    num_experts = w_gate.shape[0]
    capacity = cap.capacity_for(min(copies, expected_rows or copies), num_experts, capacity_factor)
    block_rows = max(1, min(block_rows, copies))
    ts = token_slab(expert_ids, valid, num_experts, capacity, block_rows)
    gates = jnp.where(jnp.repeat(valid, expert_ids.shape[-1]).reshape(gates.shape), gates, 0)
    return _slab_ffn(x, gates, w_gate, w_up, w_down, ts, capacity, block_rows)
