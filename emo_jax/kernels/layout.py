"""Where every token copy lives in the row buffer the Pallas kernels read and write.

Pure integer bookkeeping in plain XLA (a sort of T*K keys and a few scatters), computed
once per layer and shared by dispatch, the three grouped matmuls and combine.

Shape letters: T tokens, K copies per token, M = T * K copies, E experts, R rows per
block, NB = ceil(M / R) + E blocks (the static worst case), NR = NB * R buffer rows,
NV = NB + E visits.

Group-aligned buffer: expert e's copies fill blocks first_block[e] ..
first_block[e] + blocks[e] - 1, in token order, followed by zero padding up to the
block boundary, so every block of R rows belongs to exactly one expert and a grouped
matmul multiplies whole blocks. Blocks at or past `used_blocks` hold nothing: kernels
neither write nor read them (their memory stays uninitialised, which is why every
consumer masks by `row_valid` / `block_rows` and never reads past `used_rows`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from emo_jax.kernels.reference import sort_copies

Array = jax.Array


class RowMap(NamedTuple):
    """Token copies <-> buffer rows: the gather maps of dispatch and combine."""

    row_token: Array  # i32[NR]  token of the copy held by each row (0 for empty rows)
    row_copy: Array  # i32[NR]  copy index t * K + j of each row (0 for empty rows)
    row_valid: Array  # i32[NR]  1 where the row holds a real copy
    copy_row: Array  # i32[T, K]  buffer row of each copy (0 for padding copies)
    copy_valid: Array  # i32[T, K]  1 for real copies (valid tokens)
    used_rows: Array  # i32[1]  rows at or past this are never written nor read


class GroupLayout(NamedTuple):
    """RowMap of a group-aligned buffer plus the per-block and per-expert metadata."""

    rows: RowMap
    group_sizes: Array  # i32[E]  real rows of each expert
    block_expert: Array  # i32[NB]  expert of each block (clamped for unused blocks)
    block_rows: Array  # i32[NB]  real rows at the start of each block (0 when unused)
    used_blocks: Array  # i32[1]
    group_first_block: Array  # i32[E]
    group_blocks: Array  # i32[E]  ceil(group_sizes / R)
    # The weight-gradient schedule: every expert is visited at least once (an empty
    # expert with 0 rows), so its gradient block is written with zeros, never left
    # uninitialised. Visits past num_visits repeat the last one and are skipped.
    visit_block: Array  # i32[NV]
    visit_expert: Array  # i32[NV]
    visit_rows: Array  # i32[NV]  real rows of the visited block (0 for an empty expert)
    num_visits: Array  # i32[1]

    @property
    def block_size(self) -> int:
        return self.rows.row_token.shape[0] // self.block_expert.shape[0]


def num_blocks(copies: int, num_experts: int, block_rows: int) -> int:
    """Static block count that fits any grouping of `copies` rows into E aligned groups."""
    return -(-copies // block_rows) + num_experts


def _exclusive_cumsum(x: Array) -> Array:
    return jnp.cumsum(x) - x


def _row_map(order: Array, n_real: Array, dest: Array, n_rows: int, tokens: int, k: int,
             used_rows: Array) -> RowMap:
    """order: i32[M] copy at each sorted position (real ones first, n_real of them);
    dest: i32[M] buffer row of each sorted position."""
    m = order.shape[0]
    real = jnp.arange(m, dtype=jnp.int32) < n_real
    dest = jnp.where(real, dest, n_rows)  # out of bounds: dropped by the scatters
    row_copy = jnp.zeros((n_rows,), jnp.int32).at[dest].set(order, mode="drop")
    row_valid = jnp.zeros((n_rows,), jnp.int32).at[dest].set(1, mode="drop")
    copy_row = jnp.zeros((m,), jnp.int32).at[order].set(jnp.where(real, dest, 0), unique_indices=True)
    copy_valid = jnp.zeros((m,), jnp.int32).at[order].set(real.astype(jnp.int32), unique_indices=True)
    return RowMap(row_copy // k, row_copy, row_valid, copy_row.reshape(tokens, k),
                  copy_valid.reshape(tokens, k), jnp.reshape(used_rows, (1,)).astype(jnp.int32))


def sorted_row_map(order: Array, valid_sorted: Array, k: int) -> RowMap:
    """RowMap of the plain expert-sorted buffer [M, D] (`reference.dispatch`'s layout:
    sorted copy i in row i, padding copies last). All M rows are written."""
    m = order.shape[0]
    n_real = jnp.sum(valid_sorted.astype(jnp.int32))
    return _row_map(order.astype(jnp.int32), n_real, jnp.arange(m, dtype=jnp.int32), m, m // k, k,
                    jnp.asarray(m, jnp.int32))


def _aligned(order: Array, group_sizes: Array, tokens: int, k: int, block_rows: int) -> GroupLayout:
    m = order.shape[0]
    num_experts = group_sizes.shape[0]
    n_blocks = num_blocks(m, num_experts, block_rows)
    group_sizes = group_sizes.astype(jnp.int32)
    blocks = (group_sizes + block_rows - 1) // block_rows  # [E]
    first_block = _exclusive_cumsum(blocks)  # [E]
    used_blocks = jnp.sum(blocks)
    start = _exclusive_cumsum(group_sizes)  # [E] first sorted position of each group
    n_real = jnp.sum(group_sizes)

    pos = jnp.arange(m, dtype=jnp.int32)
    expert_of_pos = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes), pos, side="right"), num_experts - 1)
    dest = first_block[expert_of_pos] * block_rows + pos - start[expert_of_pos]
    rows = _row_map(order, n_real, dest, n_blocks * block_rows, tokens, k, used_blocks * block_rows)

    block = jnp.arange(n_blocks, dtype=jnp.int32)
    block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(blocks), block, side="right"),
                               num_experts - 1).astype(jnp.int32)
    in_group = group_sizes[block_expert] - (block - first_block[block_expert]) * block_rows
    block_valid_rows = jnp.where(block < used_blocks, jnp.clip(in_group, 0, block_rows), 0)

    visits = jnp.maximum(blocks, 1)  # empty experts get one visit of 0 rows
    first_visit = _exclusive_cumsum(visits)
    num_visits = jnp.sum(visits)
    v = jnp.minimum(jnp.arange(n_blocks + num_experts, dtype=jnp.int32), num_visits - 1)
    visit_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(visits), v, side="right"),
                               num_experts - 1).astype(jnp.int32)
    visit_block = first_block[visit_expert] + v - first_visit[visit_expert]
    # An empty expert's visit reads any in-range block (masked to 0 rows); keep it at
    # an already-used block so no new block is fetched.
    visit_block = jnp.clip(visit_block, 0, jnp.maximum(used_blocks - 1, 0)).astype(jnp.int32)
    visit_rows = jnp.where(blocks[visit_expert] > 0, block_valid_rows[visit_block], 0)
    one = lambda s: jnp.reshape(s, (1,)).astype(jnp.int32)
    return GroupLayout(rows, group_sizes, block_expert, block_valid_rows.astype(jnp.int32), one(used_blocks),
                       first_block.astype(jnp.int32), blocks.astype(jnp.int32), visit_block, visit_expert,
                       visit_rows.astype(jnp.int32), one(num_visits))


def group_layout(expert_ids: Array, valid: Array, num_experts: int, block_rows: int) -> GroupLayout:
    """Layout of the T*K token copies, grouped by expert, groups aligned to blocks.

    expert_ids: i32[T, K]; valid: bool[T] (padding tokens are in no group).
    """
    tokens, k = expert_ids.shape
    order, group_sizes, _ = sort_copies(expert_ids, valid, num_experts)
    return _aligned(order, group_sizes, tokens, k, block_rows)


def layout_from_group_sizes(group_sizes: Array, rows: int, block_rows: int) -> GroupLayout:
    """Layout of `rows` already-sorted rows (the grouped-matmul contract of
    `reference.grouped_matmul`): row i of group e goes to its aligned slot; rows past
    sum(group_sizes) are padding."""
    return _aligned(jnp.arange(rows, dtype=jnp.int32), group_sizes, rows, 1, block_rows)
