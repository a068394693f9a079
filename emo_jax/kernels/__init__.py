"""MoE dispatch / grouped matmul / combine backends behind one interface.

Backends (config `kernels.moe_backend`):
  reference  jax.lax.ragged_dot (XLA's grouped matmul; efficient on TPU, dense on CPU)
  blocked    expert-aligned row blocks in a lax.scan (`kernels.blocked`), fast on CPU
  auto       blocked on CPU, reference elsewhere
"""

from __future__ import annotations

import jax

from emo_jax.kernels.blocked import grouped_matmul_blocked
from emo_jax.kernels.reference import GroupedMatmul, combine, dispatch, grouped_matmul, grouped_swiglu, moe_ffn  # noqa: F401

BACKENDS = ("reference", "blocked")


def resolve_backend(name: str = "auto", platform: str | None = None) -> str:
    """'auto' -> the default backend for `platform` (default: jax's default backend)."""
    if name == "auto":
        platform = platform or jax.default_backend()
        return "blocked" if platform == "cpu" else "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; choose one of {('auto',) + BACKENDS} "
                         "(config key kernels.moe_backend).")
    return name


def grouped_matmul_for(name: str = "auto") -> GroupedMatmul:
    """The grouped-matmul function of a backend name (see module docstring)."""
    return {"reference": grouped_matmul, "blocked": grouped_matmul_blocked}[resolve_backend(name)]
