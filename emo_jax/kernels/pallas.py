"""The Pallas MoE backend: dispatch -> grouped SwiGLU -> combine with Pallas kernels and
explicit custom VJPs, on the group-aligned buffer of `kernels.layout`.

  moe_ffn:  layout (XLA, integers only) -> dispatch_rows (gather into the aligned
            buffer) -> gmm x 3 with silu(gate) * up in XLA between -> combine_rows
            (weighted sum of each token's K rows; the shared experts are copies with
            gate 1 like any other)
  VJPs:     d dispatch = a combine with unit weights; d combine = a gather of dy
            scaled by each row's gate, plus per-copy gate gradients <dy_t, y_copy>;
            d gmm = gmm against the transposed weights (d lhs) and a per-expert
            lhs^T @ dy (d weights, `tgmm`).

The kernels come from `pallas_tpu` (Mosaic; on CPU through TPU interpret mode) or
`pallas_gpu` (Triton), chosen by `kernel_set`. `backend(...)` packages them behind
the contracts of `kernels.reference` (dispatch, grouped_matmul, combine, moe_ffn), so
the expert-parallel path can use them too.

Rows the layout leaves unused are never written nor read; every kernel masks rows
without a copy with `where`, so uninitialised memory never reaches an output or a
gradient.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from emo_jax import compat
from emo_jax.kernels import layout as layout_lib
from emo_jax.kernels.layout import GroupLayout, RowMap
from emo_jax.kernels.reference import Dispatched, MoEBackend, sort_copies

Array = jax.Array

# Rows per aligned block (one expert per block): the M tile of every grouped matmul.
DEFAULT_BLOCK_ROWS = 128


class KernelSet(NamedTuple):
    """The raw kernels of one platform (contracts in `pallas_tpu`)."""

    name: str
    gather_rows: Callable[..., Array]
    combine_rows: Callable[..., Array]
    gmm: Callable[..., Array]
    tgmm: Callable[..., Array]
    block_rows: int


@functools.cache
def kernel_set(platform: str | None = None, interpret: Any = None, block_rows: int = DEFAULT_BLOCK_ROWS,
               tile_rows: int | None = None, tile_tokens: int | None = None) -> KernelSet:
    """Kernels for `platform` ('tpu', 'gpu' or 'cpu'; default: jax's default backend).

    'cpu' means the TPU kernels in TPU interpret mode (correctness only, slow).
    `interpret`: None to compile; `pltpu.InterpretParams(...)` for the TPU kernels or
    True for the GPU kernels to run them on CPU. Tiles default per platform.
    Cached, so equal arguments give the identical (hashable) kernel set.
    """
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        from emo_jax.kernels import pallas_gpu as k
        extra = dict(interpret=bool(interpret))
        rows = dict(tile_rows=tile_rows or 32)
        tokens = dict(tile_tokens=tile_tokens or 32)
        name = "pallas_gpu" + ("_interpret" if interpret else "")
    elif platform in ("tpu", "cpu"):
        from emo_jax.kernels import pallas_tpu as k
        if platform == "cpu" and interpret is None:
            _, pltpu = compat.pallas_modules()
            interpret = pltpu.InterpretParams()
        extra = dict(interpret=interpret)
        rows = dict(tile_rows=tile_rows or 128)
        tokens = dict(tile_tokens=tile_tokens or 64)
        name = "pallas_tpu" + ("_interpret" if interpret is not None else "")
    else:
        raise ValueError(f"no Pallas MoE kernels for platform {platform!r}")
    return KernelSet(
        name,
        functools.partial(k.gather_rows, **rows, **extra),
        functools.partial(k.combine_rows, **tokens, **extra),
        functools.partial(k.gmm, **extra),
        functools.partial(k.tgmm, **extra),
        block_rows)


# ---------------------------------------------------------------------------- ops with VJPs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dispatch_rows(ks: KernelSet, x: Array, rows: RowMap) -> Array:
    """Gathers token rows into the buffer: out[r] = x[row_token[r]] (0 for empty rows).
    x: [T, D] -> [NR, D]."""
    return ks.gather_rows(x, rows.row_token, rows.row_valid, rows.used_rows)


def _dispatch_fwd(ks, x, rows):
    return dispatch_rows(ks, x, rows), (x, rows)


def _dispatch_bwd(ks, res, d_rows):
    x, rows = res
    # Each token collects the cotangents of its K copies: a combine with unit weights.
    dx = ks.combine_rows(d_rows, rows.copy_row, rows.copy_valid, rows.copy_valid.astype(jnp.float32),
                         out_dtype=x.dtype)
    return compat.psum_to_match(dx, x), None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def combine_rows(ks: KernelSet, ys: Array, gates: Array, rows: RowMap) -> Array:
    """y[t] = sum_j gates[t, j] * ys[copy_row[t, j]] over real copies, summed in float32.
    ys: [NR, D]; gates: f32[T, K] -> [T, D] in ys's dtype."""
    return ks.combine_rows(ys, rows.copy_row, rows.copy_valid, gates, out_dtype=ys.dtype)


def _combine_fwd(ks, ys, gates, rows):
    return combine_rows(ks, ys, gates, rows), (ys, gates, rows)


def _combine_bwd(ks, res, dy):
    ys, gates, rows = res
    # where, not a multiply: a padding token's gate may be NaN.
    row_gate = jnp.where(rows.row_valid > 0, gates.reshape(-1)[rows.row_copy], 0.0).astype(jnp.float32)
    d_ys = ks.gather_rows(dy, rows.row_token, rows.row_valid, rows.used_rows, row_gate)
    d_gates = ks.combine_rows(ys, rows.copy_row, rows.copy_valid, dy, gate_grads=True)
    return (compat.psum_to_match(d_ys, ys), compat.psum_to_match(d_gates.astype(gates.dtype), gates), None)


combine_rows.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gmm(ks: KernelSet, lhs: Array, rhs: Array, layout: GroupLayout) -> Array:
    """Grouped matmul on the aligned buffer: [NR, A] x [E, A, B] -> [NR, B]."""
    return ks.gmm(lhs, rhs, layout)


def _gmm_fwd(ks, lhs, rhs, layout):
    return gmm(ks, lhs, rhs, layout), (lhs, rhs, layout)


def _gmm_bwd(ks, res, dy):
    lhs, rhs, layout = res
    d_lhs = ks.gmm(dy, rhs, layout, transpose_rhs=True, out_dtype=lhs.dtype)
    # Under shard_map the weights may be replicated over axes the tokens vary over:
    # their gradient is then summed over those axes, in float32.
    needs_sum = bool(compat.varying_axes(lhs, dy) - compat.varying_axes(rhs))
    d_rhs = ks.tgmm(lhs, dy, layout, num_experts=rhs.shape[0],
                    out_dtype=jnp.float32 if needs_sum else rhs.dtype)
    return compat.psum_to_match(d_lhs, lhs), compat.psum_to_match(d_rhs, rhs).astype(rhs.dtype), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def reverse(rows: RowMap) -> RowMap:
    """The K = 1 map read backwards: buffer rows -> the original rows (for un-dispatching
    the output of a grouped matmul back to the caller's row order)."""
    m = rows.copy_row.shape[0]
    return RowMap(rows.copy_row[:, 0], jnp.arange(m, dtype=jnp.int32), rows.copy_valid[:, 0],
                  rows.row_token[:, None], rows.row_valid[:, None], jnp.full((1,), m, jnp.int32))


# ---------------------------------------------------------------------------- the backend


def moe_ffn(x: Array, expert_ids: Array, gates: Array, valid: Array, w_gate: Array, w_up: Array,
            w_down: Array, *, ks: KernelSet) -> Array:
    """Same contract as `reference.moe_ffn`, through the aligned buffer end to end."""
    layout = layout_lib.group_layout(expert_ids, valid, w_gate.shape[0], ks.block_rows)
    xs = dispatch_rows(ks, x, layout.rows)
    h = jax.nn.silu(gmm(ks, xs, w_gate, layout)) * gmm(ks, xs, w_up, layout)
    ys = gmm(ks, h, w_down, layout)
    return combine_rows(ks, ys, gates, layout.rows)


def dispatch(x: Array, expert_ids: Array, valid: Array, num_experts: int, *, ks: KernelSet) -> Dispatched:
    """Same contract as `reference.dispatch` (plain sorted buffer [T * K, D])."""
    order, group_sizes, valid_sorted = sort_copies(expert_ids, valid, num_experts)
    rows = layout_lib.sorted_row_map(order, valid_sorted, expert_ids.shape[-1])
    return Dispatched(dispatch_rows(ks, x, rows), order, group_sizes, valid_sorted)


def combine(y_sorted: Array, order: Array, valid_sorted: Array, gates: Array, *, ks: KernelSet) -> Array:
    """Same contract as `reference.combine`."""
    rows = layout_lib.sorted_row_map(order, valid_sorted, gates.shape[-1])
    return combine_rows(ks, y_sorted, gates.astype(jnp.float32), rows)


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array, *, ks: KernelSet) -> Array:
    """Same contract as `reference.grouped_matmul`: rows grouped contiguously by
    group_sizes; rows past sum(group_sizes) give 0. Re-lays rows into aligned blocks
    and back (two gathers): use `moe_ffn`, which stays aligned, where possible."""
    layout = layout_lib.layout_from_group_sizes(group_sizes, lhs.shape[0], ks.block_rows)
    ys = gmm(ks, dispatch_rows(ks, lhs, layout.rows), rhs, layout)
    return dispatch_rows(ks, ys, reverse(layout.rows))


@functools.cache
def backend(ks: KernelSet) -> MoEBackend:
    """The Pallas backend on kernel set `ks` (cached: one identity per kernel set)."""
    bind = lambda f: functools.partial(f, ks=ks)
    return MoEBackend(ks.name, bind(dispatch), bind(grouped_matmul), bind(combine), bind(moe_ffn))
