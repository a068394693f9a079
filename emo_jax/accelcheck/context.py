"""What every section shares: the shapes, the interpret flag, the peaks, and the kernels.

The GPU kernels are always the Triton ones (`pallas_gpu`, jax's Pallas flash attention);
`interpret=True` runs the very same kernels in Pallas's interpreter (on CPU), so the tiny
CPU run exercises the code paths of the GPU run with only shapes and this flag changed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from emo_jax import kernels
from emo_jax.accelcheck.shapes import Shapes
from emo_jax.kernels import pallas
from emo_jax.kernels.attention import attention_for
from emo_jax.kernels.reference import MoEBackend


@dataclasses.dataclass(frozen=True)
class Context:
    shapes: Shapes
    interpret: bool
    # "bf16" / "fp32" -> {"datasheet": FLOP/s or None, "measured": FLOP/s or None}
    peaks: dict = dataclasses.field(default_factory=dict)
    # implementation -> why: found pathologically slow by an earlier section (see timing)
    slow: dict = dataclasses.field(default_factory=dict)

    def peak(self, dtype: str, which: str) -> float | None:
        return self.peaks.get(dtype, {}).get(which)


def moe_kernel_set(ctx: Context) -> pallas.KernelSet:
    """The GPU (Triton) MoE kernels: compiled, or interpreted with the tiny tiles."""
    s = ctx.shapes
    return pallas.kernel_set("gpu", True if ctx.interpret else None, block_rows=s.block_rows,
                             tile_rows=s.tile_rows, tile_tokens=s.tile_tokens)


def moe_backend(ctx: Context, name: str) -> MoEBackend:
    """'pallas' -> the GPU kernels of `moe_kernel_set`; other names -> `kernels.backend_for`."""
    if name == "pallas":
        return pallas.backend(moe_kernel_set(ctx))
    return kernels.backend_for(name, jax.default_backend())


def flash_attention(ctx: Context):
    """jax's Pallas (Triton) flash attention with segment ids, (q, k, v, seg) -> out."""
    from emo_jax.kernels import attention_pallas  # looked up at call time: tests may patch it

    return functools.partial(_flash, block=ctx.shapes.attention_block, interpret=ctx.interpret,
                             module=attention_pallas)


def _flash(q, k, v, segment_ids, *, block, interpret, module):
    return module.gpu_flash_attention(q, k, v, segment_ids, block=block, interpret=interpret)


def blocked_attention(ctx: Context):
    """The pure-JAX blocked attention with the check's tile size, (q, k, v, seg) -> out."""
    return attention_for("blocked", ctx.shapes.attention_block)
