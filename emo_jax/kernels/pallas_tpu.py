"""Mosaic TPU (Pallas) kernels of the MoE: row gather, combine, gate gradients and the
grouped matmuls on the group-aligned buffer of `kernels.layout`.

Raw kernels, no autodiff: `kernels.pallas` wraps them in custom VJPs. Each takes
`interpret`: None compiles for TPU; a `pltpu.InterpretParams(...)` runs the TPU
semantics on CPU (the tests turn on the race detector and NaN-filled uninitialised
memory; see docs/kernels.md#pallas-backend). Interpret mode is for correctness only, never timing.

Gathers are row DMAs from HBM (`pl.ANY`) into the VMEM output block, one per real row,
all signalling one DMA semaphore; index tiles arrive in SMEM blocks (whole index
arrays would not fit SMEM at EMO sizes). Rows that hold nothing get no DMA and are
zeroed with `where`, so garbage or NaN in them never reaches an output.

Blocks at or past `used_blocks` / `used_rows` map onto the last used block (the index
maps clamp), so Pallas neither fetches nor writes back anything for them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from emo_jax import compat
from emo_jax.kernels.layout import GroupLayout

Array = jax.Array


def _tile(n: int, prefs: tuple[int, ...]) -> int:
    """The first of `prefs` that divides n, else n itself (a full-dimension block)."""
    return next((p for p in prefs if p <= n and n % p == 0), n)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _fori(n: int, body) -> None:
    jax.lax.fori_loop(0, n, lambda i, c: (body(i), c)[1], 0)


# ---------------------------------------------------------------------------- gathers


@functools.partial(jax.jit, static_argnames=("tile_rows", "interpret"))
def gather_rows(x: Array, row_token: Array, row_valid: Array, used_rows: Array, scale: Array | None = None,
                *, tile_rows: int = 128, interpret=None) -> Array:
    """out[r] = scale[r] * x[row_token[r]] where row_valid[r] else 0, for rows r < used_rows.

    x: [N, D]; row_token, row_valid: i32[NR]; used_rows: i32[1]; scale: f32[NR] or None.
    Returns [NR, D] in x's dtype; tiles of rows at or past used_rows are not written.
    """
    pl, pltpu = compat.pallas_modules()
    nr = row_token.shape[0]
    d = x.shape[1]
    tr = tile_rows  # a power of two >= 128 on TPU (rank-1 SMEM blocks); smaller when interpreted
    if nr % tr:  # pad with empty rows (only the plain sorted layout can need it)
        pad = lambda a: None if a is None else jnp.pad(a, (0, -nr % tr))
        out = gather_rows(x, pad(row_token), pad(row_valid), used_rows, pad(scale), tile_rows=tr,
                          interpret=interpret)
        return out[:nr]
    has_scale = scale is not None

    def block(i, used_ref):
        last = jnp.maximum((used_ref[0] + tr - 1) // tr - 1, 0)
        return jnp.minimum(i, last)

    smem = lambda: pl.BlockSpec((tr,), lambda i, u: (block(i, u),), memory_space=pltpu.SMEM)
    column = lambda: pl.BlockSpec((tr, 1), lambda i, u: (block(i, u), 0))
    in_specs = [pl.BlockSpec(memory_space=pl.ANY), smem(), smem(), column()] + ([column()] if has_scale else [])

    def kernel(used_ref, x_hbm, tok_ref, valid_s_ref, valid_v_ref, *rest):
        scale_ref = rest[0] if has_scale else None
        o_ref, sem = rest[-2], rest[-1]

        @pl.when(pl.program_id(0) * tr < used_ref[0])
        def _():
            def copy(r):
                return pltpu.make_async_copy(x_hbm.at[pl.ds(tok_ref[r], 1)], o_ref.at[pl.ds(r, 1)], sem)

            def start(r):
                pl.when(valid_s_ref[r] > 0)(lambda: copy(r).start())

            def wait(r):
                pl.when(valid_s_ref[r] > 0)(lambda: copy(r).wait())

            _fori(tr, start)
            _fori(tr, wait)
            rows = o_ref[...]
            if has_scale:
                rows = rows.astype(jnp.float32) * scale_ref[...]
            # Rows without a copy got no DMA: uninitialised, so select, never multiply.
            o_ref[...] = jnp.where(valid_v_ref[...] > 0, rows, 0).astype(o_ref.dtype)

    args = [x, row_token, row_valid, row_valid[:, None]] + ([scale.astype(jnp.float32)[:, None]] if has_scale else [])
    args = compat.vary_all(used_rows, *args)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(nr // tr,), in_specs=in_specs,
        out_specs=pl.BlockSpec((tr, d), lambda i, u: (block(i, u), 0)),
        scratch_shapes=[pltpu.SemaphoreType.DMA(())])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=compat.out_struct((nr, d), x.dtype, args[1]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret, name="moe_gather_rows")(*args)


def _gather_per_token(pl, pltpu, ys_hbm, row_ref, valid_s_ref, buf, sem, tt: int, k: int) -> None:
    """buf[j, t] <- ys[copy_row[t, j]] for the real copies of this token tile."""
    def copy(c):
        return pltpu.make_async_copy(ys_hbm.at[pl.ds(row_ref[c], 1)], buf.at[c % k, pl.ds(c // k, 1)], sem)

    _fori(tt * k, lambda c: pl.when(valid_s_ref[c] > 0)(lambda: copy(c).start()))
    _fori(tt * k, lambda c: pl.when(valid_s_ref[c] > 0)(lambda: copy(c).wait()))


def _token_tile(t: int, k: int, d: int, itemsize: int, tile_tokens: int) -> int:
    """Tokens per combine step: divides T, keeps the gather buffer [K, TT, D] under ~4 MiB
    of VMEM and makes the SMEM index block TT * K (K a power of two) at least 128 long
    (the TPU rule for rank-1 blocks), unless it is the whole array."""
    for p in (tile_tokens, 128, 64, 32, 16, 8):
        if p <= tile_tokens and t % p == 0 and k * p * d * itemsize <= 4 << 20 and (p * k >= 128 or p == t):
            return p
    return t


@functools.partial(jax.jit, static_argnames=("out_dtype", "gate_grads", "tile_tokens", "interpret"))
def combine_rows(ys: Array, copy_row: Array, copy_valid: Array, weights_or_dy: Array, *, out_dtype=None,
                 gate_grads: bool = False, tile_tokens: int = 64, interpret=None) -> Array:
    """Per token, its K rows of ys: weighted sum, or (gate_grads) their dot with dy.

    ys: [NR, D]; copy_row, copy_valid: i32[T, K].
    combine:    weights f32[T, K] -> out[t] = sum_{j real} w[t, j] * ys[copy_row[t, j]]  [T, D]
    gate_grads: dy [T, D] -> out[t, j] = <dy[t], ys[copy_row[t, j]]> for real copies, else 0  f32[T, K]
    Sums run in float32.
    """
    pl, pltpu = compat.pallas_modules()
    t, k_real = copy_row.shape
    d = ys.shape[1]
    k = 1 << (k_real - 1).bit_length()  # K padded to a power of two with copies that are not real
    if k != k_real:
        pad = lambda a: jnp.pad(a, ((0, 0), (0, k - k_real)))
        copy_row, copy_valid = pad(copy_row), pad(copy_valid)
        if not gate_grads:
            weights_or_dy = pad(weights_or_dy)
    tt = _token_tile(t, k, d, jnp.dtype(ys.dtype).itemsize, tile_tokens)
    smem = lambda: pl.BlockSpec((tt * k,), lambda i: (i,), memory_space=pltpu.SMEM)
    tk_block = lambda: pl.BlockSpec((tt, k), lambda i: (i, 0))
    if gate_grads:
        third = pl.BlockSpec((tt, d), lambda i: (i, 0))
        out_spec, out_shape = pl.BlockSpec((tt, k), lambda i: (i, 0)), ((t, k), jnp.float32)
    else:
        third = tk_block()
        out_spec, out_shape = pl.BlockSpec((tt, d), lambda i: (i, 0)), ((t, d), out_dtype or ys.dtype)

    def kernel(ys_hbm, row_ref, valid_s_ref, valid_v_ref, third_ref, o_ref, buf, sem):
        _gather_per_token(pl, pltpu, ys_hbm, row_ref, valid_s_ref, buf, sem, tt, k)
        valid = valid_v_ref[...] > 0  # [TT, K]
        if gate_grads:
            dy = third_ref[...].astype(jnp.float32)
            lane = jax.lax.broadcasted_iota(jnp.int32, (tt, k), 1)
            out = jnp.zeros((tt, k), jnp.float32)
            for j in range(k_real):
                prod = jnp.where(valid[:, j:j + 1], buf[j].astype(jnp.float32) * dy, 0.0)
                out = jnp.where(lane == j, jnp.sum(prod, axis=1, keepdims=True), out)
            o_ref[...] = out
        else:
            w = third_ref[...]
            acc = jnp.zeros((tt, d), jnp.float32)
            for j in range(k_real):
                # where, not a multiply: rows of padding copies were never gathered.
                acc = acc + jnp.where(valid[:, j:j + 1], buf[j].astype(jnp.float32) * w[:, j:j + 1], 0.0)
            o_ref[...] = acc.astype(o_ref.dtype)

    third_arg = weights_or_dy if gate_grads else weights_or_dy.astype(jnp.float32)
    args = compat.vary_all(ys, copy_row.reshape(-1), copy_valid.reshape(-1), copy_valid, third_arg)
    out = pl.pallas_call(
        kernel, grid=(t // tt,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), smem(), smem(), tk_block(), third],
        out_specs=out_spec, out_shape=compat.out_struct(out_shape[0], out_shape[1], args[0]),
        scratch_shapes=[pltpu.VMEM((k, tt, d), ys.dtype), pltpu.SemaphoreType.DMA(())],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret, name="moe_gate_grads" if gate_grads else "moe_combine_rows")(*args)
    return out[:, :k_real] if gate_grads else out


# ---------------------------------------------------------------------------- grouped matmuls


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "interpret"))
def gmm(lhs: Array, rhs: Array, layout: GroupLayout, *, transpose_rhs: bool = False, out_dtype=None,
        interpret=None) -> Array:
    """out[block b] = lhs[block b] @ rhs[expert of b] (or @ rhs[e].T), on the aligned buffer.

    lhs: [NR, A]; rhs: [E, A, B] (transpose_rhs: [E, B, A]). Returns [NR, B]; rows past a
    block's real rows are 0; blocks at or past used_blocks are not written.
    """
    pl, pltpu = compat.pallas_modules()
    nr, a = lhs.shape
    b = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    r = layout.block_size
    nb = nr // r
    tk = a if a <= 2048 else _tile(a, (2048, 1024, 512, 256, 128))
    tn = _tile(b, (512, 256, 128))
    nk = a // tk

    def clamp(bi, ki, used_ref):
        tail = bi >= used_ref[0]
        return jnp.where(tail, jnp.maximum(used_ref[0] - 1, 0), bi), jnp.where(tail, nk - 1, ki)

    def lhs_map(n, bi, ki, be_ref, used_ref, rows_ref):
        return clamp(bi, ki, used_ref)

    def rhs_map(n, bi, ki, be_ref, used_ref, rows_ref):
        b2, k2 = clamp(bi, ki, used_ref)
        return (be_ref[b2], n, k2) if transpose_rhs else (be_ref[b2], k2, n)

    def out_map(n, bi, ki, be_ref, used_ref, rows_ref):
        return clamp(bi, ki, used_ref)[0], n

    rhs_block = (pl.Squeezed(), tn, tk) if transpose_rhs else (pl.Squeezed(), tk, tn)
    contract = 1 if transpose_rhs else 0

    def kernel(be_ref, used_ref, rows_ref, lhs_ref, rhs_ref, o_ref, acc_ref):
        bi, ki = pl.program_id(1), pl.program_id(2)

        @pl.when(bi < used_ref[0])
        def _():
            @pl.when(ki == 0)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)

            acc_ref[...] += jax.lax.dot_general(
                lhs_ref[...], rhs_ref[...], (((1,), (contract,)), ((), ())),
                precision=_precision(lhs.dtype), preferred_element_type=jnp.float32)

            @pl.when(ki == nk - 1)
            def _():
                row = jax.lax.broadcasted_iota(jnp.int32, (r, tn), 0)
                o_ref[...] = jnp.where(row < rows_ref[bi], acc_ref[...], 0.0).astype(o_ref.dtype)

    args = compat.vary_all(layout.block_expert, layout.used_blocks, layout.block_rows, lhs, rhs)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(b // tn, nb, nk),
        in_specs=[pl.BlockSpec((r, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
        out_specs=pl.BlockSpec((r, tn), out_map),
        scratch_shapes=[pltpu.VMEM((r, tn), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=compat.out_struct((nr, b), out_dtype or lhs.dtype, args[3]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret, name="moe_gmm")(*args)


@functools.partial(jax.jit, static_argnames=("num_experts", "out_dtype", "interpret"))
def tgmm(lhs: Array, dy: Array, layout: GroupLayout, *, num_experts: int, out_dtype=jnp.float32,
         interpret=None) -> Array:
    """Weight gradient: out[e] = sum over blocks b of expert e of lhs[b]^T @ dy[b].

    lhs: [NR, A]; dy: [NR, B] -> [E, A, B]. Walks the layout's visit schedule, in which
    every expert appears at least once, so experts without rows get exact zeros.
    """
    pl, pltpu = compat.pallas_modules()
    nr, a = lhs.shape
    b = dy.shape[1]
    r = layout.block_size
    nv = layout.visit_block.shape[0]
    ta = _tile(a, (512, 256, 128))
    tb = _tile(b, (512, 256, 128))

    def lhs_map(ai, bi, v, vb_ref, ve_ref, vr_ref, nv_ref):
        return vb_ref[v], ai

    def dy_map(ai, bi, v, vb_ref, ve_ref, vr_ref, nv_ref):
        return vb_ref[v], bi

    def out_map(ai, bi, v, vb_ref, ve_ref, vr_ref, nv_ref):
        return ve_ref[v], ai, bi

    def kernel(vb_ref, ve_ref, vr_ref, nv_ref, lhs_ref, dy_ref, o_ref, acc_ref):
        v = pl.program_id(2)

        @pl.when(v < nv_ref[0])
        def _():
            e = ve_ref[v]
            first = jnp.logical_or(v == 0, ve_ref[jnp.maximum(v - 1, 0)] != e)
            last = jnp.logical_or(v == nv_ref[0] - 1, ve_ref[jnp.minimum(v + 1, nv - 1)] != e)

            @pl.when(first)
            def _():
                acc_ref[...] = jnp.zeros_like(acc_ref)

            real = jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) < vr_ref[v]
            x = jnp.where(real, lhs_ref[...], 0)
            g = jnp.where(real, dy_ref[...], 0)
            acc_ref[...] += jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), precision=_precision(lhs.dtype),
                                                preferred_element_type=jnp.float32)

            @pl.when(last)
            def _():
                o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    args = compat.vary_all(layout.visit_block, layout.visit_expert, layout.visit_rows, layout.num_visits, lhs, dy)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(a // ta, b // tb, nv),
        in_specs=[pl.BlockSpec((r, ta), lhs_map), pl.BlockSpec((r, tb), dy_map)],
        out_specs=pl.BlockSpec((pl.Squeezed(), ta, tb), out_map),
        scratch_shapes=[pltpu.VMEM((ta, tb), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=compat.out_struct((num_experts, a, b), out_dtype, args[4]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="moe_tgmm")(*args)
