"""The MoE feed-forward for a handful of tokens: each copy gathers its expert's weights.

Why: every batched backend reads the weights of all E experts, whatever the number of
token copies M = T * K: the capacity slab multiplies E x C rows (C >= 8), ragged_dot and
the grouped-matmul kernels walk all E groups. When a decode step feeds a few tokens
(batch 1 gives M = K copies), that read is the whole cost of the layer: at issue 16's
S2 shape (64 experts of [256, 128]) it is 25 MB per layer and token step. Gathering
the M copies' own weights reads M / E of that, and the matmuls are M rows as before.

`moe_layer` (emo_jax/moe.py) takes this path whenever a call has at most as many
routed copies as routed experts (`use_gathered`), on every backend; larger calls keep the
configured backend. Same contract as `reference.moe_ffn`, exact up to float rounding:
    y_t = sum_j gates[t, j] * E_{ids[t, j]}(x_t), padding tokens (valid = False) give 0,
    and a copy whose id is outside [0, E) contributes 0.
Gradients are autodiff's (the gathers' transposes scatter-add into the weights).

Shape letters: T tokens, K copies per token, D model width, H expert hidden, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def use_gathered(copies: int, num_experts: int) -> bool:
    """Whether a call with `copies` routed token copies should gather per-copy weights:
    when there are at most as many copies as experts, they read at most the whole stack.
    At exactly E copies both paths read the same bytes; the gathered one measured 1.3-1.9x
    faster for S2's batch-8 generation on an AVX2 host and 13% slower per decode step on
    the earlier host (BUILD_NOTES.md, "Tenth session")."""
    return copies <= num_experts


def moe_ffn_gathered(x: Array, expert_ids: Array, gates: Array, valid: Array, w_gate: Array, w_up: Array,
                     w_down: Array) -> Array:
    """x [T, D]; expert_ids i32[T, K]; gates f32[T, K]; valid bool[T]; w_gate, w_up
    [E, D, H], w_down [E, H, D] -> [T, D]."""
    num_experts = w_gate.shape[0]
    f32 = jnp.float32
    in_range = (expert_ids >= 0) & (expert_ids < num_experts)  # [T, K]
    ids = jnp.clip(expert_ids, 0, num_experts - 1)
    # Padding rows are zeroed first so that a NaN there reaches no weight gradient.
    x = jnp.where(valid[:, None], x, 0)
    g = jnp.einsum("td,tkdh->tkh", x, w_gate[ids], preferred_element_type=f32)
    u = jnp.einsum("td,tkdh->tkh", x, w_up[ids], preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    # Each copy's output rounded to x's dtype before its gate, like the batched backends.
    y = jnp.einsum("tkh,tkhd->tkd", h, w_down[ids], preferred_element_type=f32).astype(x.dtype)
    weight = jnp.where(in_range & valid[:, None], gates.astype(f32), 0.0)
    return jnp.einsum("tkd,tk->td", y.astype(f32), weight).astype(x.dtype)
