"""MoE dispatch / grouped matmul / combine backends behind one interface.

Backends (config `kernels.moe_backend`), each a `MoEBackend` of four stages with the
contracts of `kernels.reference` (dispatch, grouped_matmul, combine, moe_ffn):
  reference  plain XLA; jax.lax.ragged_dot (efficient on TPU, dense on CPU, padded to
             the worst case on GPU)
  blocked    reference dispatch/combine; grouped matmul as expert-aligned row blocks
             in a lax.scan (`kernels.blocked`), fast on CPU
  pallas     Pallas kernels with custom VJPs for all of it (`kernels.pallas`): Mosaic
             on TPU, Triton on GPU, the TPU kernels in interpret mode on CPU
             (correctness only, slow). Opt-in: not yet measured on an accelerator.
  auto       blocked on CPU, reference elsewhere
"""

from __future__ import annotations

import functools

import jax

from emo_jax.kernels.blocked import grouped_matmul_blocked
from emo_jax.kernels.reference import (  # noqa: F401
    Dispatched, GroupedMatmul, MoEBackend, combine, dispatch, grouped_matmul, grouped_swiglu, moe_ffn)

BACKENDS = ("reference", "blocked", "pallas")


def resolve_backend(name: str = "auto", platform: str | None = None) -> str:
    """'auto' -> the default backend for `platform` (default: jax's default backend)."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return "blocked" if platform == "cpu" else "reference"
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
    matmul = grouped_matmul_blocked if name == "blocked" else grouped_matmul
    return MoEBackend(name, dispatch, matmul, combine, functools.partial(moe_ffn, matmul=matmul))


def grouped_matmul_for(name: str = "auto") -> GroupedMatmul:
    """The grouped-matmul function of a backend name (see module docstring)."""
    return backend_for(name).grouped_matmul
