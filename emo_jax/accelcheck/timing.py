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
# A first call (compile + run) longer than this marks the implementation slow: the row is
# not timed further, and later rows and sections skip that implementation (XLA may lower
# ragged_dot on a GPU to E dense matmuls: E x the FLOPs, a minute per call at EMO's shape).
SLOW_FIRST_S = 30.0


def time_call(fn: Callable, args: tuple, repeats: int, cap_s: float = ROW_CAP_S, guard: bool = True) -> dict:
    """First call (compile + run), then up to `repeats` timed calls within `cap_s`;
    `guard`: stop after a first call slower than SLOW_FIRST_S.

    Returns {"seconds": median of the timed calls (None if the first call was slow),
    "first_s", "calls", "slow", "out": the last output}.
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    if guard and first > SLOW_FIRST_S:
        return {"seconds": None, "first_s": first, "calls": 0, "slow": True, "out": out}
    times: list[float] = []
    while len(times) < max(repeats, 1):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        if sum(times) > cap_s:
            break
    return {"seconds": statistics.median(times), "first_s": first, "calls": len(times), "slow": False, "out": out}


def slow_reason(name: str, timed: dict) -> str:
    return f"{name}: first call (compile + run) took {timed['first_s']:.0f} s (> {SLOW_FIRST_S:.0f} s)"


def bench_record(ctx: Context, name: str, impl: str, timed: dict, flops: float = 0.0, nbytes: float = 0.0,
                 dtype: str = "bf16", note: str = "", **extra: Any) -> dict:
    """A `bench` record: time, TFLOP/s, MFU against the datasheet peak of `dtype` and the
    share of the measured matmul peak, GB/s for memory-bound rows."""
    sec = timed["seconds"]
    record = {"kind": "bench", "name": name, "impl": impl, "seconds": sec, "first_call_s": round(timed["first_s"], 3),
              "calls": timed["calls"], "dtype": dtype}
    if sec is None:  # too slow to time: the first call says how slow
        note = (note + "; " if note else "") + "not timed: " + slow_reason("first call", timed).split(": ", 1)[1]
    elif flops:
        record.update(flops=flops, tflops=flops / sec / 1e12,
                      mfu=flops_lib.mfu(flops, sec, ctx.peak(dtype, "datasheet")),
                      mfu_measured=flops_lib.mfu(flops, sec, ctx.peak(dtype, "measured")))
    if nbytes and sec is not None:
        record.update(bytes=nbytes, gbs=nbytes / sec / 1e9)
    if note:
        record["note"] = note
    record.update(extra)
    return record
