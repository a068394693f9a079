"""MoE dispatch / grouped matmul / combine backends behind one interface.

Backends (config `kernels.moe_backend`), each a `MoEBackend` of four stages with the
contracts of `kernels.reference` (dispatch, grouped_matmul, combine, moe_ffn):
  reference  plain XLA; jax.lax.ragged_dot (efficient on TPU, dense on CPU, padded to
             the worst case on GPU)
  capacity   the layer as one custom VJP from tokens to tokens: the expert SwiGLU as
             three batched matmuls over a per-expert capacity slab gathered straight
             from the tokens, overflow copies in loops over 512..32-row blocks,
             dropless (`kernels.capacity`), the fastest on CPU; its single stages are
             the reference dispatch/combine and the blocked grouped matmul
  blocked    reference dispatch/combine; grouped matmul as expert-aligned row blocks
             in a lax.scan (`kernels.blocked`)
  pallas     Pallas kernels with custom VJPs for all of it (`kernels.pallas`): Mosaic
             on TPU, Triton on GPU, the TPU kernels in interpret mode on CPU
             (correctness only, slow). Opt-in: not yet measured on an accelerator.
  auto       capacity on CPU, reference elsewhere
`moe.moe_layer` bypasses the backend for calls with at most as many token copies as
experts (a decode step): `kernels.gathered` gathers each copy's expert weights instead
of reading the whole stack.
"""

from __future__ import annotations

import functools

import jax

from emo_jax.kernels.blocked import grouped_matmul_blocked
from emo_jax.kernels.capacity import moe_ffn_capacity
from emo_jax.kernels.reference import (  # noqa: F401
    Dispatched, GroupedMatmul, MoEBackend, combine, dispatch, grouped_matmul, grouped_swiglu, moe_ffn)

BACKENDS = ("reference", "capacity", "blocked", "pallas")


def resolve_backend(name: str = "auto", platform: str | None = None) -> str:
    """'auto' -> the default backend for `platform` (default: jax's default backend)."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return "capacity" if platform == "cpu" else "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; choose one of {('auto',) + BACKENDS} "
                         "(config key kernels.moe_backend).")
    return name


@functools.cache
def backend_for(name: str = "auto", platform: str | None = None) -> MoEBackend:
    """The backend called `name` (see module docstring) for `platform`."""
    name = resolve_backend(name, platform)
    if name == "pallas":
        from emo_jax.kernels import pallas
        return pallas.backend(pallas.kernel_set(platform))
    if name == "capacity":
        # The single-matmul contract (grouped_matmul) is served by the blocked loop;
        # the layer (moe_ffn) runs the fused capacity SwiGLU.
        return MoEBackend(name, dispatch, grouped_matmul_blocked, combine, moe_ffn_capacity)
    matmul = grouped_matmul_blocked if name == "blocked" else grouped_matmul
    return MoEBackend(name, dispatch, matmul, combine, functools.partial(moe_ffn, matmul=matmul))


def local_expert_ffn(backend: MoEBackend, expected_rows: int):
    """`backend.moe_ffn` for a buffer of which about `expected_rows` rows are filled
    (the capacity backend sizes its slab for them instead of for the whole buffer)."""
    if backend.name == "capacity":
        return functools.partial(moe_ffn_capacity, expected_rows=expected_rows)
    return backend.moe_ffn


def grouped_matmul_for(name: str = "auto") -> GroupedMatmul:
    """The grouped-matmul function of a backend name (see module docstring)."""
    return backend_for(name).grouped_matmul
