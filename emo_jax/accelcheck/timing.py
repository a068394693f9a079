"""Timed calls (compile excluded, bounded) and benchmark records with TFLOP/s and MFU."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax

from emo_jax.accelcheck import flops as flops_lib
from emo_jax.accelcheck.context import Context

# Timed calls of one row stop once they have taken this long (at least one call is timed):
# a pathological lowering costs seconds, not the whole budget.
ROW_CAP_S = 8.0


def time_call(fn: Callable, args: tuple, repeats: int, cap_s: float = ROW_CAP_S) -> dict:
    """First call (compile + run), then up to `repeats` timed calls within `cap_s`.

    Returns {"seconds": median of the timed calls, "first_s", "calls", "out": last output}.
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < max(repeats, 1):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        if sum(times) > cap_s:
            break
    return {"seconds": statistics.median(times), "first_s": first, "calls": len(times), "out": out}


def bench_record(ctx: Context, name: str, impl: str, timed: dict, flops: float = 0.0, nbytes: float = 0.0,
                 dtype: str = "bf16", note: str = "", **extra: Any) -> dict:
    """A `bench` record: time, TFLOP/s, MFU against the datasheet peak of `dtype` and the
    share of the measured matmul peak, GB/s for memory-bound rows."""
    sec = timed["seconds"]
    record = {"kind": "bench", "name": name, "impl": impl, "seconds": sec, "first_call_s": round(timed["first_s"], 3),
              "calls": timed["calls"], "dtype": dtype}
    if flops:
        record.update(flops=flops, tflops=flops / sec / 1e12,
                      mfu=flops_lib.mfu(flops, sec, ctx.peak(dtype, "datasheet")),
                      mfu_measured=flops_lib.mfu(flops, sec, ctx.peak(dtype, "measured")))
    if nbytes:
        record.update(bytes=nbytes, gbs=nbytes / sec / 1e9)
    if note:
        record["note"] = note
    record.update(extra)
    return record
