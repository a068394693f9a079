"""Causal attention within segments through jax's Pallas kernels (docs/attention.md).

  splash_attention     TPU: jax's splash attention (Mosaic). The causal mask is static,
                       so blocks above the diagonal are skipped at compile time; segment
                       ids are compared inside each block.
  gpu_flash_attention  GPU: jax's flash attention (Triton), causal (the key loop of a
                       query block stops at the diagonal) with segment ids.

Both take the layout of the model, q, k, v: [B, S, H, D], segment_ids: i32[B, S], scale
1/sqrt(D), and pad S up to a whole number of blocks with a segment id (-1) no real token
carries. `interpret=True` runs the kernel in Pallas's interpreter (any backend, slow:
tests only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from emo_jax import compat
from emo_jax.kernels.attention_blocked import FILL_SEGMENT, pad_to

Array = jax.Array

def _padded_length(seq: int, block: int) -> int:
    return -(-seq // block) * block


def _pad_sequence(q, k, v, segment_ids, length: int):
    """Pads the sequence axis to `length`: zero rows, in a segment of their own."""
    return (*(pad_to(x, length, axis=1) for x in (q, k, v)),
            pad_to(segment_ids, length, axis=1, value=FILL_SEGMENT))


@functools.cache
def _splash_kernel(seq: int, heads: int, block: int, interpret: bool):
    """A splash kernel for one row: causal mask over `seq`, the same for every head."""
    splash = compat.splash_attention_module()
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int = 128,
                     interpret: bool = False) -> Array:
    """TPU splash attention. q, k, v: [B, S, H, D]; segment_ids: i32[B, S] -> [B, S, H, D]."""
    if block % 128:
        raise ValueError(f"splash attention needs tiles that are a multiple of 128 rows (TPU lanes), got {block}; "
                         "set kernels.attention_block to 128, 256 or 512.")
    splash = compat.splash_attention_module()
    seq, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    length = _padded_length(seq, block)
    q, k, v, segment_ids = _pad_sequence(q, k, v, segment_ids.astype(jnp.int32), length)
    # The kernel object holds device arrays (its block maps): build it outside any trace.
    with jax.ensure_compile_time_eval():
        kernel = _splash_kernel(length, heads, block, interpret)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, S, D]
    scaled = to_heads(q) * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)

    def one_row(q_row, k_row, v_row, seg_row):
        return kernel(q_row, k_row, v_row, segment_ids=splash.SegmentIds(q=seg_row, kv=seg_row))

    out = jax.vmap(one_row)(scaled, to_heads(k), to_heads(v), segment_ids)  # [B, H, S, D]
    return jnp.swapaxes(out, 1, 2)[:, :seq]


def gpu_flash_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int = 128,
                        interpret: bool = False) -> Array:
    """GPU flash attention. q, k, v: [B, S, H, D]; segment_ids: i32[B, S] -> [B, S, H, D]."""
    flash = compat.gpu_flash_attention_module()
    seq, dim = q.shape[1], q.shape[3]
    backward_block = min(block, 32)  # jax's default backward tiles (shared memory)
    length = _padded_length(seq, math.lcm(block, backward_block))
    q, k, v, segment_ids = _pad_sequence(q, k, v, segment_ids.astype(jnp.int32), length)
    sizes = flash.BlockSizes(block_q=block, block_k=block, block_q_dkv=backward_block,
                             block_kv_dkv=backward_block, block_q_dq=backward_block, block_kv_dq=backward_block)
    out = flash.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(dim), causal=True, block_sizes=sizes,
                    interpret=interpret)
    return out[:, :seq]
