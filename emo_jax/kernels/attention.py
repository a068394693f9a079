"""Causal self-attention within segments, behind one interface (docs/attention.md).

Kernels (config `kernels.attention`), all with the contract of `reference_attention`:
  reference  the [B, 1, S, S] mask and jax.nn.dot_product_attention: memory and time
             quadratic in S (every score, even those above the diagonal)
  blocked    pure JAX, flash-style: online softmax over key blocks, blocks above the
             diagonal and before the queries' documents skipped, hand-written
             backward; memory linear in S (`kernels.attention_blocked`)
  splash     TPU: jax's Pallas splash attention with segment ids
  flash_gpu  GPU: jax's Pallas (Triton) flash attention with segment ids
  auto       blocked on CPU, splash on TPU, flash_gpu on GPU (resolved when the model
             is built, from jax's default backend)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from emo_jax.kernels.attention_blocked import blocked_attention

Array = jax.Array
AttentionFn = Callable[[Array, Array, Array, Array], Array]  # (q, k, v, segment_ids) -> out

ATTENTION_KERNELS = ("reference", "blocked", "splash", "flash_gpu")
_PLATFORM_OF = {"splash": ("tpu",), "flash_gpu": ("gpu", "cuda", "rocm")}


def reference_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """Query t sees key u iff u <= t and both carry the same segment id (padding 0
    included: padding sees only padding). q, k, v: [B, S, H, D]; segment_ids: i32[B, S]."""
    from emo_jax.model.layers import causal_segment_mask  # the model package imports this module
    return jax.nn.dot_product_attention(q, k, v, mask=causal_segment_mask(segment_ids))


def resolve_attention(name: str = "auto", platform: str | None = None) -> str:
    """'auto' -> the kernel for `platform` (default: jax's default backend); a name is
    checked against the kernels and the platform they run on."""
    platform = platform or jax.default_backend()
    if name == "auto":
        if platform == "tpu":
            return "splash"
        return "flash_gpu" if platform in _PLATFORM_OF["flash_gpu"] else "blocked"
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {('auto',) + ATTENTION_KERNELS} "
                         "(config key kernels.attention).")
    if name in _PLATFORM_OF and platform not in _PLATFORM_OF[name]:
        raise ValueError(f"kernels.attention={name!r} runs on {_PLATFORM_OF[name][0]} only, not on {platform}; "
                         "use 'auto', 'blocked' or 'reference'.")
    return name


# Tile rows of the Pallas kernels when `kernels.attention_block` is 0 (splash needs
# multiples of 128: TPU lanes). `blocked` then picks its tile from the sequence length
# (`attention_blocked.default_block`: 64 rows up to 512 tokens, 128 beyond).
DEFAULT_BLOCK = {"splash": 128, "flash_gpu": 128}


@functools.cache
def attention_for(name: str = "auto", block: int = 0, platform: str | None = None) -> AttentionFn:
    """The attention function of kernel `name` (see module docstring) with tiles of
    `block` rows (0: the kernel's default, above)."""
    if block < 0:
        raise ValueError(f"attention block size must be positive (or 0 for the kernel's default), got {block} "
                         "(config key kernels.attention_block).")
    name = resolve_attention(name, platform)
    if name == "reference":
        return reference_attention
    if name == "blocked":
        return functools.partial(blocked_attention, block_q=block or None, block_k=block or None)
    block = block or DEFAULT_BLOCK[name]
    from emo_jax.kernels import attention_pallas
    kernel = attention_pallas.splash_attention if name == "splash" else attention_pallas.gpu_flash_attention
    return functools.partial(kernel, block=block)
