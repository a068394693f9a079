"""Cross-process agreement on small integer vectors: the element-wise max over processes.

Every process passes its own values (flags such as "a stop signal arrived"); every
process gets the same maximum back, so decisions taken from it (stop and save at this
step, stop on NaN) are taken at the same step everywhere. The reduction is one jitted
max over a [devices, F] int32 array whose rows are fed by each process for its own
devices: an all-reduce over the devices, no host round trip through a file system.

`start` only dispatches; `result` waits. The loop reads step t's agreement after it has
dispatched step t+1, so the device never idles for it. With one process nothing is
dispatched at all (the values are their own maximum), unless `force_collective`.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax.compat import make_mesh

_AXIS = "processes_x_devices"


class Agreement:
    """max over processes of an int vector of length `width` (values fit in int32)."""

    def __init__(self, width: int, force_collective: bool = False):
        self.width = width
        self.collective = force_collective or jax.process_count() > 1
        if not self.collective:
            return
        devices = jax.devices()
        mesh = make_mesh((len(devices),), (_AXIS,), devices=devices)
        self._rows = NamedSharding(mesh, P(_AXIS))
        self._local_devices = len(mesh.local_devices)
        self._max = jax.jit(lambda x: jnp.max(x, axis=0), out_shardings=NamedSharding(mesh, P()))

    def start(self, values: Sequence[int]) -> Any:
        """Dispatches the reduction of this process's `values`; returns a handle for `result`."""
        local = np.asarray(values, np.int32).reshape(1, self.width)
        if not self.collective:
            return local[0]
        rows = np.repeat(local, self._local_devices, axis=0)  # this process's devices' rows
        return self._max(jax.make_array_from_process_local_data(self._rows, rows))

    def result(self, handle: Any) -> np.ndarray:
        """The agreed [width] values (waits for the reduction)."""
        return np.asarray(handle.addressable_data(0) if isinstance(handle, jax.Array) else handle)

    def __call__(self, values: Sequence[int]) -> np.ndarray:
        return self.result(self.start(values))


def fingerprint(text: str) -> int:
    """A 31-bit checksum of `text` (fits the int32 the agreement uses)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def check_same_everywhere(named_values: dict[str, int], agreement: Agreement | None = None) -> None:
    """Raises (on every process) when some process has other values: compares the max and
    the min over processes (min = -max of the negated values)."""
    names = list(named_values)
    values = [int(named_values[n]) for n in names]
    agreement = agreement or Agreement(2 * len(values))
    both = agreement(values + [-v for v in values])
    high, low = both[:len(values)], -both[len(values):]
    for name, hi, lo in zip(names, high, low):
        if hi != lo:
            from emo_jax.parallel.distributed import DistributedError
            raise DistributedError(f"the {jax.process_count()} processes disagree on {name} ({lo} vs {hi}); start "
                                   "every process with the same command, config and run_dir.")
