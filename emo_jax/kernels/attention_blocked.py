"""Blocked (flash-style) causal attention within segments, in pure JAX (docs/attention.md).

Never builds a [B, H, S, S] tensor: the sequence is cut into query blocks of `block_q`
and key blocks of `block_k` rows; for every query block a loop runs over the key
blocks that can hold a visible key, with an online softmax (running max, running sum,
running output). The key blocks of query block i run from `lo[i]` to `hi(i)`:
  hi(i)  the block holding the last query of block i (causal: blocks above the
         diagonal are never visited);
  lo[i]  the block holding the first key of the earliest document any query of block
         i belongs to, over all rows of the batch (blocks wholly before every one of
         those documents are never visited).
Inside a visited tile the exact mask (key <= query, same segment) is applied, so the
result equals the reference for any segment layout (non-contiguous ids only visit
more tiles). The backward pass is hand-written (custom_vjp): it keeps only q, k, v,
the padded segment ids and block starts, the output and the log-sum-exp per query, and
recomputes each tile's probabilities,
so memory stays linear in S in both passes.

The loops slice the sequence axis only; the batch and head axes stay whole inside a
tile, so a batch sharded over a mesh stays sharded.

Short sequences (by default padded S <= UNROLL_MAX_SEQ = 512 in at most UNROLL_MAX_BLOCKS
= 8 blocks, or at most `unroll_blocks` query blocks when that is given) can take an
unrolled path instead: query block i is one static tile
against its whole key prefix [0, (i + 1) * block_q), one plain softmax, no loop and no
online rescaling. XLA:CPU runs a tile that way at about 60% of a loop tile's time
forward and 80% with the backward (a loop body's ops cannot fuse or overlap across
iterations), but the prefix includes the tiles of earlier documents that the loops
skip. So the choice is made at run time (`lax.cond`, one branch runs): the unrolled
path when the loops would visit at least UNROLL_MIN_VISITED of the causal triangle's
tiles (rows of one long document), the loops otherwise (packed short documents). The
unrolled path never visits a block above the diagonal; its memory is quadratic only
up to the cap, linear beyond (BUILD_NOTES.md, "Sixth session").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array

# Visible to padding-of-the-padding only: the rows added to reach a whole block.
FILL_SEGMENT = -1

# Default cap of the unrolled path: padded sequences of at most UNROLL_MAX_SEQ tokens
# (its scratch memory is quadratic in S up to here) in at most UNROLL_MAX_BLOCKS query
# blocks (each unrolled block adds to the program: tiny tiles would compile for long).
UNROLL_MAX_SEQ = 512
UNROLL_MAX_BLOCKS = 8


def default_block(seq: int) -> int:
    """Tile rows when none is given: 64 up to UNROLL_MAX_SEQ tokens, 128 beyond. On XLA:CPU
    64-row tiles measured 13-36% faster forward + backward than 128 at S <= 512, and up to
    1.27x slower at S = 2048 with 64-dim heads (BUILD_NOTES.md, "Eighth session")."""
    return 64 if seq <= UNROLL_MAX_SEQ else 128


def first_occurrence(segment_ids: Array) -> Array:
    """Index of the first token of each token's segment in its row. i32[B, S] -> i32[B, S].

    One stable sort per row, so segment ids need not be contiguous or ordered.
    """
    batch, seq = segment_ids.shape
    order = jnp.argsort(segment_ids, axis=1, stable=True)  # [B, S]
    ordered = jnp.take_along_axis(segment_ids, order, axis=1)
    index = jnp.arange(seq, dtype=jnp.int32)[None, :]
    run_start = jnp.concatenate([jnp.ones((batch, 1), bool), ordered[:, 1:] != ordered[:, :-1]], axis=1)
    first_in_run = jax.lax.cummax(jnp.where(run_start, index, 0), axis=1)  # position in `order`
    first_sorted = jnp.take_along_axis(order, first_in_run, axis=1).astype(jnp.int32)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    return jnp.zeros((batch, seq), jnp.int32).at[rows, order].set(first_sorted)


def key_block_starts(segment_ids: Array, block_q: int, block_k: int) -> Array:
    """lo[i]: first key block any query of query block i can see, over the whole batch.

    segment_ids: i32[B, Sp] with Sp a multiple of block_q. Returns i32[Sp // block_q].
    """
    first = first_occurrence(segment_ids)  # [B, Sp]
    per_block = first.reshape(first.shape[0], -1, block_q).min(axis=(0, 2))  # [NQ]
    return (per_block // block_k).astype(jnp.int32)


def pad_to(x: Array, length: int, axis: int, value=0) -> Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


class _Tiles:
    """Static tiling of one call: block sizes, padded length, block counts."""

    def __init__(self, seq: int, block_q: int | None, block_k: int | None):
        block_q, block_k = (default_block(seq) if b is None else b for b in (block_q, block_k))
        if block_q < 1 or block_k < 1:
            raise ValueError(f"attention block sizes must be positive, got block_q={block_q}, block_k={block_k}.")
        block_q, block_k = min(block_q, seq), min(block_k, seq)  # a short sequence is one tile
        step = math.lcm(block_q, block_k)
        self.block_q, self.block_k = block_q, block_k
        self.padded = -(-seq // step) * step
        self.n_q = self.padded // block_q

    def last_key_block(self, i: Array) -> Array:
        """hi(i): the key block holding the last query of query block i."""
        return ((i + 1) * self.block_q - 1) // self.block_k


def _tile_mask(seg_q: Array, seg_k: Array, q_start: Array, k_start: Array) -> Array:
    """bool[B, 1, bq, bk]: key visible to query (key <= query, same segment)."""
    pos_q = q_start + jnp.arange(seg_q.shape[1], dtype=jnp.int32)
    pos_k = k_start + jnp.arange(seg_k.shape[1], dtype=jnp.int32)
    causal = pos_k[None, :] <= pos_q[:, None]
    same = seg_q[:, :, None] == seg_k[:, None, :]
    return (causal[None] & same)[:, None]


def _key_tile(q_i: Array, seg_q: Array, q_start: Array, k: Array, v: Array, seg: Array, k_start: Array,
              block_k: int, key_major: bool = False) -> tuple[Array, Array, Array, Array]:
    """The key tile at k_start against query tile q_i [B, H, bq, D]: (scores [B, H, bq, bk],
    bool visibility [B, 1, bq, bk], k_j, v_j [B, H, bk, D]); key_major: scores and
    visibility transposed, [B, H, bk, bq] and [B, 1, bk, bq] (`_key_major_scores`)."""
    k_j = jax.lax.dynamic_slice_in_dim(k, k_start, block_k, axis=2)
    v_j = jax.lax.dynamic_slice_in_dim(v, k_start, block_k, axis=2)
    seg_k = jax.lax.dynamic_slice_in_dim(seg, k_start, block_k, axis=1)
    visible = _tile_mask(seg_q, seg_k, q_start, k_start)
    if key_major:
        return _key_major_scores(k_j, q_i), jnp.swapaxes(visible, 2, 3), k_j, v_j
    return jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j), visible, k_j, v_j


def _key_major_scores(keys: Array, queries: Array) -> Array:
    """keys [B, H, bk, D] . queries [B, H, bq, D] -> f32[B, H, bk, bq], a tile with keys as rows.

    The backward works on key-major tiles because then dK = dS^T Q and dV = P^T dO are
    plain row-major matmuls (`bhkq,bhqd->bhkd`). The query-major forms contract the
    second-minor axis of both operands, which XLA:CPU runs on a generic dot path about
    twice as slow (BUILD_NOTES.md, "Eighth session"); only dQ needs the transpose then
    (`_dq_from_key_major`).
    """
    return jnp.einsum("bhkd,bhqd->bhkq", keys, queries)


def _dq_from_key_major(ds_t: Array, k_j: Array) -> Array:
    """dS k_j from the key-major ds_t [B, H, bk, bq] and k_j [B, H, bk, D]: f32[B, H, bq, D].

    The transpose of ds_t is materialised behind an optimization barrier: left to XLA it
    is folded into the dot's dimension numbers, which is the slow form again. (Merging
    batch and heads into one axis also materialises it, equally fast, but breaks a head
    sharding over the `tensor` mesh axis: XLA then gathers the tiles every iteration.)
    """
    return jnp.einsum("bhqk,bhkd->bhqd", jax.lax.optimization_barrier(jnp.swapaxes(ds_t, 2, 3)), k_j)


def _forward(q: Array, k: Array, v: Array, seg: Array, lo: Array, tiles: _Tiles) -> tuple[Array, Array]:
    """q, k, v: f32[B, H, Sp, D] (q already scaled); seg: i32[B, Sp]; lo: i32[NQ].

    Returns (out f32[B, H, Sp, D], lse f32[B, H, Sp]).
    """
    bq, bk = tiles.block_q, tiles.block_k
    batch, heads, _, dim = q.shape

    def query_block(i, outputs):
        out, lse = outputs
        q_start = i * bq
        q_i = jax.lax.dynamic_slice_in_dim(q, q_start, bq, axis=2)  # [B, H, bq, D]
        seg_q = jax.lax.dynamic_slice_in_dim(seg, q_start, bq, axis=1)

        def key_block(j, carry):
            m, l, acc = carry
            s, visible, _, v_j = _key_tile(q_i, seg_q, q_start, k, v, seg, j * bk, bk)
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + p.sum(axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p, v_j)
            return m_new, l, acc

        init = (jnp.full((batch, heads, bq), -jnp.inf, jnp.float32), jnp.zeros((batch, heads, bq), jnp.float32),
                jnp.zeros((batch, heads, bq, dim), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo[i], tiles.last_key_block(i) + 1, key_block, init)
        # Every query sees at least itself (same position, same segment): l > 0.
        out = jax.lax.dynamic_update_slice_in_dim(out, acc / l[..., None], q_start, axis=2)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), q_start, axis=2)
        return out, lse

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(q.shape[:3], jnp.float32))
    return jax.lax.fori_loop(0, tiles.n_q, query_block, init)


def _backward(q, k, v, seg, lo, out, lse, d_out, tiles: _Tiles):
    """Gradients of the forward pass with respect to (scaled q, k, v), all f32[B, H, Sp, D]."""
    bq, bk = tiles.block_q, tiles.block_k
    delta = jnp.sum(d_out * out, axis=-1)  # [B, H, Sp]: rowsum(dO * O)

    def query_block(i, grads):
        dq, dk, dv = grads
        q_start = i * bq
        q_i = jax.lax.dynamic_slice_in_dim(q, q_start, bq, axis=2)
        do_i = jax.lax.dynamic_slice_in_dim(d_out, q_start, bq, axis=2)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, q_start, bq, axis=2)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, q_start, bq, axis=2)
        seg_q = jax.lax.dynamic_slice_in_dim(seg, q_start, bq, axis=1)

        def key_block(j, carry):
            dq_i, dk, dv = carry
            k_start = j * bk
            s_t, visible_t, k_j, v_j = _key_tile(q_i, seg_q, q_start, k, v, seg, k_start, bk, key_major=True)
            # A select, not an additive -inf bias: a masked score that is NaN (NaN in a
            # padding token's key) must give p = 0, not NaN (NaN + -inf = NaN).
            p_t = jnp.where(visible_t, jnp.exp(s_t - lse_i[:, :, None, :]), 0.0)
            ds_t = p_t * (_key_major_scores(v_j, do_i) - delta_i[:, :, None, :])
            dq_i = dq_i + _dq_from_key_major(ds_t, k_j)
            dk_j = jax.lax.dynamic_slice_in_dim(dk, k_start, bk, axis=2) + jnp.einsum("bhkq,bhqd->bhkd", ds_t, q_i)
            dv_j = jax.lax.dynamic_slice_in_dim(dv, k_start, bk, axis=2) + jnp.einsum("bhkq,bhqd->bhkd", p_t, do_i)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, k_start, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, k_start, axis=2)
            return dq_i, dk, dv

        dq_i, dk, dv = jax.lax.fori_loop(lo[i], tiles.last_key_block(i) + 1, key_block,
                                         (jnp.zeros_like(q_i), dk, dv))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, q_start, axis=2)
        return dq, dk, dv

    zeros = jnp.zeros(q.shape, jnp.float32)
    return jax.lax.fori_loop(0, tiles.n_q, query_block, (zeros, zeros, zeros))


def _prefix_tile(q_i: Array, seg_q: Array, q_start: int, k: Array, seg: Array, key_major: bool = False) -> Array:
    """Scores of query block q_i [B, H, bq, D] against every key before the block's end
    (static length n = q_start + bq), -inf where not visible: f32[B, H, bq, n], or
    key-major f32[B, H, n, bq] (`_key_major_scores`)."""
    n = q_start + q_i.shape[2]
    # Additive (one fused pass on XLA:CPU): a NaN score stays NaN even where masked,
    # which the loops' selects avoid; this path reads the whole prefix anyway.
    bias = jnp.where(_tile_mask(seg_q, seg[:, :n], jnp.int32(q_start), jnp.int32(0)), 0.0, -jnp.inf)
    if key_major:
        return _key_major_scores(k[:, :, :n], q_i) + jnp.swapaxes(bias, 2, 3)
    return jnp.einsum("bhqd,bhkd->bhqk", q_i, k[:, :, :n]) + bias


def _forward_unrolled(q: Array, k: Array, v: Array, seg: Array, tiles: _Tiles) -> tuple[Array, Array]:
    """`_forward` with the query blocks unrolled, each against its whole key prefix."""
    bq = tiles.block_q
    outs, lses = [], []
    for i in range(tiles.n_q):
        q_start = i * bq
        s = _prefix_tile(q[:, :, q_start:q_start + bq], seg[:, q_start:q_start + bq], q_start, k, seg)
        m = s.max(axis=-1)  # finite: every query sees itself
        p = jnp.exp(s - m[..., None])
        l = p.sum(axis=-1)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", p, v[:, :, :q_start + bq]) / l[..., None])
        lses.append(m + jnp.log(l))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _backward_unrolled(q, k, v, seg, out, lse, d_out, tiles: _Tiles):
    """`_backward` with the query blocks unrolled, each against its whole key prefix."""
    bq = tiles.block_q
    delta = jnp.sum(d_out * out, axis=-1)  # [B, H, Sp]
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dqs = []
    for i in range(tiles.n_q):
        q_start, n = i * bq, (i + 1) * bq
        rows = slice(q_start, n)
        q_i, do_i = q[:, :, rows], d_out[:, :, rows]
        p_t = jnp.exp(_prefix_tile(q_i, seg[:, rows], q_start, k, seg, key_major=True) - lse[:, :, None, rows])
        ds_t = p_t * (_key_major_scores(v[:, :, :n], do_i) - delta[:, :, None, rows])
        dqs.append(_dq_from_key_major(ds_t, k[:, :, :n]))
        dk = dk.at[:, :, :n].add(jnp.einsum("bhkq,bhqd->bhkd", ds_t, q_i))
        dv = dv.at[:, :, :n].add(jnp.einsum("bhkq,bhqd->bhkd", p_t, do_i))
    return jnp.concatenate(dqs, axis=2), dk, dv


def _heads(q, k, v, tiles: _Tiles):
    """[B, S, H, D] inputs -> f32[B, H, Sp, D] (q scaled by 1/sqrt(D)), and the scale."""
    to_heads = lambda x: pad_to(jnp.swapaxes(x.astype(jnp.float32), 1, 2), tiles.padded, axis=2)  # noqa: E731
    scale = 1.0 / math.sqrt(q.shape[-1])
    return to_heads(q) * scale, to_heads(k), to_heads(v), scale


def _segments(segment_ids, tiles: _Tiles):
    """Padded segment ids i32[B, Sp] and each query block's first key block lo i32[NQ]."""
    seg = pad_to(segment_ids.astype(jnp.int32), tiles.padded, axis=1, value=FILL_SEGMENT)
    return seg, key_block_starts(seg, tiles.block_q, tiles.block_k)


UNROLL_MIN_VISITED = 0.8


def _use_unrolled(lo: Array, tiles: _Tiles) -> Array:
    """bool[]: the loops would visit at least UNROLL_MIN_VISITED of the causal tiles."""
    hi = tiles.last_key_block(jnp.arange(tiles.n_q, dtype=jnp.int32))
    return jnp.sum(hi - lo + 1) >= UNROLL_MIN_VISITED * jnp.sum(hi + 1)


def _unroll_eligible(tiles: _Tiles, unroll_blocks: int | None) -> bool:
    """Static: at most `unroll_blocks` query blocks, or (None) a padded sequence of at
    most UNROLL_MAX_SEQ tokens in at most UNROLL_MAX_BLOCKS blocks."""
    if unroll_blocks is None:
        return tiles.padded <= UNROLL_MAX_SEQ and tiles.n_q <= UNROLL_MAX_BLOCKS
    return tiles.n_q <= unroll_blocks


def _by_path(lo: Array, tiles: _Tiles, unroll_blocks: int | None, unrolled, loops):
    """loops() when the unrolled path is not eligible (`_unroll_eligible`), else
    whichever of unrolled() and loops() `_use_unrolled` picks (one runs). The forward
    and the backward both choose here, from the same `lo`, so they take the same path."""
    if not _unroll_eligible(tiles, unroll_blocks):
        return loops()
    return jax.lax.cond(_use_unrolled(lo, tiles), unrolled, loops)


def _attend(qs, kh, vh, seg, lo, tiles: _Tiles, unroll_blocks: int | None):
    """(out, lse) by the loops, or by the unrolled path when eligible and worth it."""
    return _by_path(lo, tiles, unroll_blocks, lambda: _forward_unrolled(qs, kh, vh, seg, tiles),
                    lambda: _forward(qs, kh, vh, seg, lo, tiles))


def _attend_grads(qs, kh, vh, seg, lo, out, lse, d_out, tiles: _Tiles, unroll_blocks: int | None):
    """The backward of `_attend`, by the path its forward took."""
    return _by_path(lo, tiles, unroll_blocks, lambda: _backward_unrolled(qs, kh, vh, seg, out, lse, d_out, tiles),
                    lambda: _backward(qs, kh, vh, seg, lo, out, lse, d_out, tiles))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def blocked_attention(q: Array, k: Array, v: Array, segment_ids: Array, block_q: int | None = None,
                      block_k: int | None = None, unroll_blocks: int | None = None) -> Array:
    """Causal attention inside segments, scale 1/sqrt(D), without an S x S tensor.

    q, k, v: [B, S, H, D]; segment_ids: i32[B, S] (equal ids attend to each other,
    padding 0 included, as `layers.causal_segment_mask`). Returns [B, S, H, D] in q's
    dtype; S need not be a multiple of the block sizes; a block size left None is
    `default_block(S)`. The unrolled path may run (module docstring) up to `unroll_blocks`
    query blocks, or by default (None) up to a padded length of UNROLL_MAX_SEQ tokens in
    at most UNROLL_MAX_BLOCKS blocks; 0: always the loops.
    """
    out, _ = _blocked_fwd(q, k, v, segment_ids, block_q, block_k, unroll_blocks)
    return out


def _blocked_fwd(q, k, v, segment_ids, block_q, block_k, unroll_blocks):
    tiles = _Tiles(q.shape[1], block_q, block_k)
    qs, kh, vh, _ = _heads(q, k, v, tiles)
    seg, lo = _segments(segment_ids, tiles)
    out, lse = _attend(qs, kh, vh, seg, lo, tiles, unroll_blocks)
    result = jnp.swapaxes(out[:, :, :q.shape[1]], 1, 2).astype(q.dtype)
    # The padded segments and block starts are kept (small), the head-major copies of
    # q, k, v are rebuilt in the backward (large).
    return result, (q, k, v, seg, lo, out, lse)


def _blocked_bwd(block_q, block_k, unroll_blocks, residuals, d_result):
    q, k, v, seg, lo, out, lse = residuals
    tiles = _Tiles(q.shape[1], block_q, block_k)
    qs, kh, vh, scale = _heads(q, k, v, tiles)
    d_out = pad_to(jnp.swapaxes(d_result.astype(jnp.float32), 1, 2), tiles.padded, axis=2)
    dq, dk, dv = _attend_grads(qs, kh, vh, seg, lo, out, lse, d_out, tiles, unroll_blocks)
    back = lambda x, like: jnp.swapaxes(x[:, :, :like.shape[1]], 1, 2).astype(like.dtype)  # noqa: E731
    return back(dq * scale, q), back(dk, k), back(dv, v), None


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)
