"""FLOP counts, MFU, and the metric writers (JSONL, TensorBoard, console)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import Config

# Dense bf16 peak FLOP/s per device, from vendor specifications (no sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def flops_per_token(config: Config, active_matmul_params: int) -> float:
    """Training FLOPs per token: 3 x forward (backward = 2 x forward).

    Forward = 2 x (active matmul parameters, LM head included, input embedding
    excluded) + causal attention 2 * 2 * S * H * Dh / 2 per layer (QK^T and AV over
    half the context on average, as MaxText counts it). The extra forward pass of the
    global-batch load balance is overhead and not counted (MFU counts model FLOPs).
    """
    m = config.model
    attention = 2 * 2 * config.data.seq_len * m.n_heads * m.head_dim / 2 * m.n_layers
    return 3 * (2 * active_matmul_params + attention)


def active_matmul_params(config: Config) -> int:
    from emo_jax.param_count import count_params
    counts = count_params(config)
    head = config.model.d_model * config.model.vocab_size
    return counts.active_non_embedding + head


def peak_for(device_kind: str, table: dict[str, float] = PEAK_FLOPS) -> float | None:
    """The table entry whose name occurs in `device_kind` (longest name first), or None."""
    kind = device_kind.lower()
    for name, flops in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return flops
    return None


def peak_flops_per_device() -> float | None:
    return peak_for(jax.devices()[0].device_kind)


def to_python(metrics: dict) -> dict[str, Any]:
    """Device metrics -> floats (scalars) and lists of floats (per-layer values)."""
    out = {}
    for key, value in jax.device_get(metrics).items():
        arr = np.asarray(value)
        out[key] = float(arr) if arr.ndim == 0 else [float(v) for v in arr.reshape(-1)]
    return out


class WindowMean:
    """Mean of every step metric over a log window, summed on the device (no host sync
    per step). The learning rate is reported as the window's last value."""

    LAST_VALUE = ("learning_rate",)

    def __init__(self):
        self._sums: dict | None = None
        self._last: dict = {}
        self.steps = 0

    def add(self, metrics: dict) -> None:
        mean_keys = {k: v for k, v in metrics.items() if k not in self.LAST_VALUE}
        self._last = {k: v for k, v in metrics.items() if k in self.LAST_VALUE}
        self._sums = mean_keys if self._sums is None else jax.tree.map(jnp.add, self._sums, mean_keys)
        self.steps += 1

    def result(self) -> dict[str, Any]:
        """Python floats / per-layer lists of the means; resets the window."""
        if not self.steps:
            raise ValueError("no step in the log window")
        out = to_python(jax.tree.map(lambda s: s / self.steps, self._sums))
        out.update(to_python(self._last))
        out["window_steps"] = self.steps
        self._sums, self._last, self.steps = None, {}, 0
        return out


class MetricsWriter:
    """Writes every logged step to metrics.jsonl and TensorBoard event files (host 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                print("tensorboardX missing: TensorBoard events are not written", file=sys.stderr)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is None:
            return
        for key, value in metrics.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self._tb.add_scalar(f"{prefix}/{key}/layer_{i}", v, step)
            elif isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def format_line(step: int, m: dict[str, Any]) -> str:
    mfu = f"  mfu {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
    return (f"step {step:6d}  loss {m['loss']:.4f}  ce {m['cross_entropy']:.4f}  lb {m['load_balance']:.4f}  "
            f"z {m['router_z']:.3f}  gnorm {m['grad_norm']:.3f}  lr {m['learning_rate']:.2e}  "
            f"pool {m['mean_pool_size']:.1f}  tok/s {m['tokens_per_second']:,.0f}{mfu}")
