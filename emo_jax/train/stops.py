"""Why a run stops early, as flags every process contributes to a cross-process agreement.

SIGTERM (a TPU preemption notice) and SIGINT (Ctrl-C) set a flag instead of raising; the
loop agrees on the flags across processes (parallel/agreement.py) and all processes save
the same step and stop. A second Ctrl-C on a process raises KeyboardInterrupt there at
once (the way out of a run that does not stop: no checkpoint).
"""

from __future__ import annotations

import os
import signal
from typing import Sequence

import numpy as np

CHECK_EVERY_ENV = "EMO_JAX_STOP_CHECK_EVERY"


def check_every() -> int:
    """Steps between stop agreements (default 1). Each is one small all-reduce across the
    processes (about 10 ms between 2 CPU processes here, far less on TPU/GPU
    interconnects); a stop then happens up to that many steps after the signal. It must
    be the same on every process (checked at start)."""
    from emo_jax.config import ConfigError
    value = os.environ.get(CHECK_EVERY_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{CHECK_EVERY_ENV}={value!r}: expected a positive integer (steps between stop checks)")
    return int(value)


# Positions in the agreed flag vector.
SIGNAL = 0  # a stop signal arrived (value: the signal number, so the log can name it)
WIDTH = 1


class StopSignals:
    """Context manager: SIGTERM and SIGINT set `received` (the signal number, 0 = none)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0
        self.interrupts = 0  # Ctrl-C count
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def flags(self) -> list[int]:
        """This process's contribution to the agreed stop flags."""
        flags = [0] * WIDTH
        flags[SIGNAL] = int(self.received)
        return flags


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def agreed_signal(agreed: Sequence[int] | np.ndarray) -> int:
    """The signal number some process received (the highest), 0 when none did."""
    return int(agreed[SIGNAL])
