"""GPU (Pallas Triton) kernels of the MoE, same contracts as `kernels.pallas_tpu`.

Why Triton: it is the Pallas GPU backend whose kernels run on any recent NVIDIA GPU
and can be checked on CPU (`interpret=True` runs the kernel body in the generic Pallas
interpreter, which also fills outputs with NaN so an unwritten row shows). jax 0.11
deprecates it in favour of Mosaic GPU, which has no public CPU interpreter yet; see
BUILD_NOTES.md, "Pallas kernels". None of these kernels has run on a GPU in this repository yet.

Every program works on whole tiles through pointer arithmetic on full-array refs
(Triton's BlockSpecs cannot follow data-dependent indices): gathers load R rows at
the indices of an int vector (masked, so padding rows cost no traffic), grouped
matmuls read each block's expert from an i32 array. Tiles must be powers of two and
matmul tiles at least 16 wide (`tl.dot`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from emo_jax import compat
from emo_jax.kernels.layout import GroupLayout

Array = jax.Array


def _modules():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    return pl, plgpu


def _pow2_tile(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False, precision=None) -> Array:
    """a @ b of two 2-D tiles (either transposed), accumulated in float32: what `pl.dot`
    did (deprecated in jax 0.11, removed in 0.12), written as the dot_general it lowered to."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _params(num_warps: int, num_stages: int):
    _, plgpu = _modules()
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _load_rows(plgpu, ref, rows: Array, col0: Array, width: int, valid: Array) -> Array:
    """ref[rows[i], col0:col0 + width] for the valid i; the others read nothing and are 0.

    Both indices are int arrays (broadcast to [R, width]): the generic interpreter
    cannot mix an array index with a slice in a masked load; Triton sees the same
    pointer arithmetic either way.
    """
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    return plgpu.load(ref.at[rows[:, None], cols], mask=valid[:, None], other=0)


# ---------------------------------------------------------------------------- gathers


@functools.partial(jax.jit, static_argnames=("tile_rows", "tile_cols", "interpret"))
def gather_rows(x: Array, row_token: Array, row_valid: Array, used_rows: Array, scale: Array | None = None,
                *, tile_rows: int = 32, tile_cols: int = 512, interpret: bool = False) -> Array:
    """Same contract as `pallas_tpu.gather_rows`: [N, D] -> [NR, D], rows at or past
    used_rows (whole tiles) not written."""
    pl, plgpu = _modules()
    nr = row_token.shape[0]
    d = x.shape[1]
    tr = tile_rows
    if nr % tr:
        pad = lambda a: None if a is None else jnp.pad(a, (0, -nr % tr))
        return gather_rows(x, pad(row_token), pad(row_valid), used_rows, pad(scale), tile_rows=tr,
                           tile_cols=tile_cols, interpret=interpret)[:nr]
    td = _pow2_tile(d, tile_cols)
    has_scale = scale is not None

    def kernel(x_ref, tok_ref, valid_ref, used_ref, *rest):
        o_ref = rest[-1]
        i, c = pl.program_id(0), pl.program_id(1)

        @pl.when(i * tr < used_ref[0])
        def _():
            rows = pl.ds(pl.multiple_of(i * tr, tr), tr)
            cols = pl.ds(pl.multiple_of(c * td, td), td)
            valid = valid_ref[rows] > 0
            vals = _load_rows(plgpu, x_ref, tok_ref[rows], c * td, td, valid)
            if has_scale:
                vals = vals.astype(jnp.float32) * rest[0][rows][:, None]
            o_ref[rows, cols] = jnp.where(valid[:, None], vals, 0).astype(o_ref.dtype)

    args = [x, row_token, row_valid, used_rows] + ([scale.astype(jnp.float32)] if has_scale else [])
    args = compat.vary_all(*args)
    return pl.pallas_call(
        kernel, grid=(nr // tr, d // td), out_shape=compat.out_struct((nr, d), x.dtype, args[0]),
        compiler_params=_params(4, 1), interpret=interpret, name="moe_gather_rows")(*args)


@functools.partial(jax.jit, static_argnames=("out_dtype", "gate_grads", "tile_tokens", "tile_cols", "interpret"))
def combine_rows(ys: Array, copy_row: Array, copy_valid: Array, weights_or_dy: Array, *, out_dtype=None,
                 gate_grads: bool = False, tile_tokens: int = 32, tile_cols: int = 256,
                 interpret: bool = False) -> Array:
    """Same contract as `pallas_tpu.combine_rows` (weighted sum, or gate gradients)."""
    pl, plgpu = _modules()
    t, k = copy_row.shape
    d = ys.shape[1]
    tt = tile_tokens
    if t % tt:
        pad = lambda a: jnp.pad(a, ((0, -t % tt), (0, 0)))
        return combine_rows(ys, pad(copy_row), pad(copy_valid), pad(weights_or_dy), out_dtype=out_dtype,
                            gate_grads=gate_grads, tile_tokens=tt, tile_cols=tile_cols, interpret=interpret)[:t]
    td = _pow2_tile(d, tile_cols)

    def combine_kernel(ys_ref, row_ref, valid_ref, w_ref, o_ref):
        i, c = pl.program_id(0), pl.program_id(1)
        toks = pl.ds(pl.multiple_of(i * tt, tt), tt)
        cols = pl.ds(pl.multiple_of(c * td, td), td)
        acc = jnp.zeros((tt, td), jnp.float32)
        for j in range(k):
            valid = valid_ref[toks, j] > 0
            vals = _load_rows(plgpu, ys_ref, row_ref[toks, j], c * td, td, valid).astype(jnp.float32)
            acc += jnp.where(valid[:, None], vals * w_ref[toks, j][:, None], 0.0)
        o_ref[toks, cols] = acc.astype(o_ref.dtype)

    def gate_grads_kernel(ys_ref, row_ref, valid_ref, dy_ref, o_ref):
        toks = pl.ds(pl.multiple_of(pl.program_id(0) * tt, tt), tt)
        for j in range(k):
            valid = valid_ref[toks, j] > 0
            rows = row_ref[toks, j]

            def body(c, acc):
                cols = pl.ds(pl.multiple_of(c * td, td), td)
                vals = _load_rows(plgpu, ys_ref, rows, c * td, td, valid).astype(jnp.float32)
                prod = jnp.where(valid[:, None], vals * dy_ref[toks, cols].astype(jnp.float32), 0.0)
                return acc + jnp.sum(prod, axis=1)

            o_ref[toks, j] = jax.lax.fori_loop(0, d // td, body, jnp.zeros((tt,), jnp.float32))

    if gate_grads:
        kernel, grid, out_shape = gate_grads_kernel, (t // tt,), ((t, k), jnp.float32)
        third = weights_or_dy
    else:
        kernel, grid, out_shape = combine_kernel, (t // tt, d // td), ((t, d), out_dtype or ys.dtype)
        third = weights_or_dy.astype(jnp.float32)
    args = compat.vary_all(ys, copy_row, copy_valid, third)
    return pl.pallas_call(
        kernel, grid=grid, out_shape=compat.out_struct(out_shape[0], out_shape[1], args[0]),
        compiler_params=_params(4, 1), interpret=interpret,
        name="moe_gate_grads" if gate_grads else "moe_combine_rows")(*args)


# ---------------------------------------------------------------------------- grouped matmuls


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tile_n", "tile_k", "num_warps",
                                             "num_stages", "interpret"))
def gmm(lhs: Array, rhs: Array, layout: GroupLayout, *, transpose_rhs: bool = False, out_dtype=None,
        tile_n: int = 128, tile_k: int = 64, num_warps: int = 8, num_stages: int = 3,
        interpret: bool = False) -> Array:
    """Same contract as `pallas_tpu.gmm`. One program per (row block, column tile); the
    row block is the layout's block (R rows, one expert)."""
    pl, plgpu = _modules()
    nr, a = lhs.shape
    b = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    r = layout.block_size
    nb = nr // r
    bn = _pow2_tile(b, tile_n)
    bk = _pow2_tile(a, tile_k if lhs.dtype != jnp.float32 else min(tile_k, 32))
    precision = _precision(lhs.dtype)

    def kernel(lhs_ref, rhs_ref, be_ref, rows_ref, used_ref, o_ref):
        bi, n = pl.program_id(0), pl.program_id(1)

        @pl.when(bi < used_ref[0])
        def _():
            e = be_ref[bi]
            rows = pl.ds(pl.multiple_of(bi * r, r), r)
            ncols = pl.ds(pl.multiple_of(n * bn, bn), bn)

            def body(kk, acc):
                ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
                w = rhs_ref[e, ncols, ks] if transpose_rhs else rhs_ref[e, ks, ncols]
                return acc + _dot(lhs_ref[rows, ks], w, trans_b=transpose_rhs, precision=precision)

            acc = jax.lax.fori_loop(0, a // bk, body, jnp.zeros((r, bn), jnp.float32))
            real = jax.lax.broadcasted_iota(jnp.int32, (r, bn), 0) < rows_ref[bi]
            o_ref[rows, ncols] = jnp.where(real, acc, 0.0).astype(o_ref.dtype)

    args = compat.vary_all(lhs, rhs, layout.block_expert, layout.block_rows, layout.used_blocks)
    return pl.pallas_call(
        kernel, grid=(nb, b // bn), out_shape=compat.out_struct((nr, b), out_dtype or lhs.dtype, args[0]),
        compiler_params=_params(num_warps, num_stages), interpret=interpret, name="moe_gmm")(*args)


@functools.partial(jax.jit, static_argnames=("num_experts", "out_dtype", "tile_a", "tile_b", "num_warps",
                                             "num_stages", "interpret"))
def tgmm(lhs: Array, dy: Array, layout: GroupLayout, *, num_experts: int, out_dtype=jnp.float32,
         tile_a: int = 128, tile_b: int = 128, num_warps: int = 8, num_stages: int = 3,
         interpret: bool = False) -> Array:
    """Same contract as `pallas_tpu.tgmm`. One program per (expert, A tile, B tile) sums
    over that expert's blocks: no atomics, deterministic, and an expert without rows
    runs zero iterations and writes zeros."""
    pl, plgpu = _modules()
    nr, a = lhs.shape
    b = dy.shape[1]
    r = layout.block_size
    ba = _pow2_tile(a, tile_a)
    bb = _pow2_tile(b, tile_b)
    precision = _precision(lhs.dtype)

    def kernel(lhs_ref, dy_ref, first_ref, nblk_ref, rows_ref, o_ref):
        e, ai, bi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        acols = pl.ds(pl.multiple_of(ai * ba, ba), ba)
        bcols = pl.ds(pl.multiple_of(bi * bb, bb), bb)
        first = first_ref[e]

        def body(i, acc):
            blk = first + i
            rows = pl.ds(pl.multiple_of(blk * r, r), r)
            real = jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) < rows_ref[blk]
            x = jnp.where(real, lhs_ref[rows, acols], 0)
            g = jnp.where(real, dy_ref[rows, bcols], 0)
            return acc + _dot(x, g, trans_a=True, precision=precision)

        acc = jax.lax.fori_loop(0, nblk_ref[e], body, jnp.zeros((ba, bb), jnp.float32))
        o_ref[e, acols, bcols] = acc.astype(o_ref.dtype)

    args = compat.vary_all(lhs, dy, layout.group_first_block, layout.group_blocks, layout.block_rows)
    return pl.pallas_call(
        kernel, grid=(num_experts, a // ba, b // bb),
        out_shape=compat.out_struct((num_experts, a, b), out_dtype, args[0]),
        compiler_params=_params(num_warps, num_stages), interpret=interpret, name="moe_tgmm")(*args)
