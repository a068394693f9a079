"""Model-FLOP counts of the benchmarked computations, and MFU.

Model FLOPs count the useful multiply-adds once (2 FLOPs each): no padding rows, no
recomputation, no dense-equivalent work a lowering may add. A backward pass counts twice
its forward (one product for each input's gradient), so forward + backward = 3 x forward.

  grouped matmul [M, A] x [E, A, B]   2 M A B          (M = real rows)
  expert SwiGLU over M rows           3 x 2 M D H      (gate, up, down)
  MoE layer (forward)                 3 x 2 T K D H + 2 T D N   (K experts per token,
                                      shared included; N routed experts: the router)
  causal attention (forward)          2 B S^2 NH HD    (QK^T and PV over the S^2 / 2
                                      causal pairs, as emo_jax.train.metrics counts it);
                                      `visible_pairs` gives the pairs documents leave
  training step                       emo_jax.train.metrics.flops_per_token x tokens

MFU = model FLOPs / seconds / peak; the results say which peak (datasheet or measured).
"""

from __future__ import annotations

import numpy as np

# Dense float32 (no tensor cores, no TF32) peak FLOP/s per device, vendor datasheets. The
# bf16 figures are emo_jax.train.metrics.PEAK_FLOPS; both are read with metrics.peak_for.
FP32_PEAK_FLOPS = {"h100": 67e12, "h200": 67e12, "a100": 19.5e12, "b200": 80e12}


def grouped_matmul(rows: int, a: int, b: int) -> float:
    """[rows, a] x [a, b] per row's group: 2 rows a b."""
    return 2.0 * rows * a * b


def swiglu(rows: int, d: int, h: int) -> float:
    """W_down (silu(W_gate x) * W_up x) over `rows` rows: three matmuls."""
    return 3 * grouped_matmul(rows, d, h)


def moe_layer(tokens: int, d: int, h: int, top_k: int, n_routed: int, backward: bool = True) -> float:
    """Experts (top_k copies per token, shared included) + router; x3 with the backward."""
    forward = swiglu(tokens * top_k, d, h) + 2.0 * tokens * d * n_routed
    return 3 * forward if backward else forward


def causal_attention(batch: int, seq: int, heads: int, head_dim: int, backward: bool = True) -> float:
    """QK^T and PV over S^2 / 2 pairs per row and head: 2 * 2 * HD * S^2 / 2 each."""
    forward = 2.0 * batch * seq * seq * heads * head_dim
    return 3 * forward if backward else forward


def visible_pairs(segment_ids: np.ndarray) -> int:
    """(query, key) pairs with key <= query in the same segment (padding 0 included, as
    the kernels treat it): the work a document-aware kernel cannot skip."""
    total = 0
    for row in np.asarray(segment_ids):
        _, counts = np.unique(row, return_counts=True)
        total += int(np.sum(counts * (counts + 1) // 2))
    return total


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """flops / seconds / peak, or None without a peak or a time."""
    if not peak or not seconds or seconds <= 0:
        return None
    return flops / seconds / peak
