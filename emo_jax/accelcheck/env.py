"""Section `env`: versions, the device, and the matmul peaks (datasheet and measured).

The measured peak is one square matmul, n = 8192 in bf16 and in float32 at "highest"
precision (true fp32, no TF32) on a GPU (n = 256 in the tiny run), the median of a few
timed calls after a warm-up: the ceiling the MFU columns are also quoted against.
"""

from __future__ import annotations

import os
import platform as platform_lib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp

from emo_jax.accelcheck import flops as flops_lib
from emo_jax.accelcheck.context import Context
from emo_jax.accelcheck.report import PEAKS_RECORD, SectionLog
from emo_jax.accelcheck.timing import time_call


def _version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return "-"


def nvidia_smi() -> str | None:
    """GPU name, driver, clocks and power limit from nvidia-smi, if there is one."""
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
        return f"{query}: {out.stdout.strip() or out.stderr.strip()}"
    except Exception as err:  # noqa: BLE001 - informational only
        return f"nvidia-smi failed: {err}"


def measure_matmul_peak(n: int, dtype, repeats: int) -> float:
    """FLOP/s of one [n, n] x [n, n] matmul (2 n^3 FLOPs), median of `repeats` calls."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    timed = time_call(mm, (a, b), repeats, guard=False)
    return 2.0 * n ** 3 / timed["seconds"]


def peaks(device_kind: str, n: int, repeats: int) -> dict:
    """{"bf16": {"datasheet", "measured"}, "fp32": {...}} in FLOP/s."""
    from emo_jax.train.metrics import peak_for

    return {
        "bf16": {"datasheet": peak_for(device_kind),
                 "measured": measure_matmul_peak(n, jnp.bfloat16, repeats)},
        "fp32": {"datasheet": peak_for(device_kind, flops_lib.FP32_PEAK_FLOPS),
                 "measured": measure_matmul_peak(n, jnp.float32, repeats)},
    }


def run(ctx: Context, log: SectionLog) -> dict:
    """Records the environment; returns the peaks for the other sections."""
    dev = jax.devices()[0]
    log.info("python", sys.version.split()[0])
    log.info("host", f"{platform_lib.machine()} {platform_lib.node()}")
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy"):
        log.info(f"version {name}", _version(name))
    log.info("backend", jax.default_backend())
    log.info("devices", f"{jax.device_count()} x {dev.device_kind} ({dev.platform})")
    try:
        stats = dev.memory_stats() or {}
        log.info("device memory limit GiB", round(stats.get("bytes_limit", 0) / 2**30, 1))
    except Exception as err:  # noqa: BLE001 - not every backend reports memory
        log.error("device memory", err)
    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR"):
        log.info(f"env {var}", os.environ.get(var, "-"))
    smi = nvidia_smi()
    if smi:
        log.info("nvidia-smi", smi)
    log.info("interpret (Pallas interpreter)", ctx.interpret)
    log.info("shapes", ctx.shapes.name)
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    if not on_gpu and not ctx.interpret:
        return {}  # the runner stops here: compiled Triton kernels need a GPU
    n = 8192 if on_gpu else 256
    found = peaks(dev.device_kind, n, repeats=10 if n >= 8192 else 3)
    for dtype, values in found.items():
        for which, value in values.items():
            log.info(f"peak {dtype} {which} TFLOP/s" + (f" (matmul {n}^3)" if which == "measured" else ""),
                     None if value is None else round(value / 1e12, 3))
    log.info(PEAKS_RECORD, found)
    return found
