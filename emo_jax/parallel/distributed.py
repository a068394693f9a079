"""Starting a multi-process (multi-host) JAX run, with one-line errors instead of hangs.

`initialize` wraps `jax.distributed.initialize`:
- on CPU it selects gloo cross-process collectives (`jax_cpu_collectives_implementation`),
  so several processes on one machine (or several machines) form one device mesh;
- a coordinator address that does not answer, or processes that never all arrive, stop
  the process after `timeout_s` with one line naming the address and the fix. jax itself
  would wait `initialization_timeout` and then abort the process with a C++ stack trace
  (checked on jax 0.10.2), so a watchdog thread ends the process first (exit code 3).

`check_processes_fit_mesh` checks that every process feeds the same number of batch rows,
as the loop's `make_array_from_process_local_data` assumes.
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
import threading
import time

import jax

INIT_TIMEOUT_S = 120  # default wait for the coordinator and all processes (EMO_JAX_INIT_TIMEOUT)
INIT_FAILED_EXIT = 3  # exit code of a process whose distributed start timed out


class DistributedError(RuntimeError):
    """A multi-process launch that cannot work, with a message naming the problem and the fix."""


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port), one-line error otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"coordinator address {address!r} is not HOST:PORT; set JAX_COORDINATOR_ADDRESS "
                               "like 10.0.0.2:8476.")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until something accepts TCP connections at `address` (processes > 0 only:
    process 0 starts the coordinator itself)."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError as err:
            last = err.strerror or type(err).__name__
            time.sleep(0.2)
    raise DistributedError(f"the coordinator {address} did not answer within {timeout_s:g} s ({last}); start "
                           "process 0 first, check the address and port (JAX_COORDINATOR_ADDRESS), or raise "
                           "EMO_JAX_INIT_TIMEOUT.")


def use_cpu_collectives() -> None:
    """gloo collectives between processes on CPU (the default of jax 0.10; set explicitly
    because older jax had none by default and the option may be renamed later)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError, KeyError):  # jax without the option: its default applies
        pass


def _watchdog(timeout_s: float, message: str) -> threading.Timer:
    def fire():
        print(message, file=sys.stderr, flush=True)
        os._exit(INIT_FAILED_EXIT)  # jax's initialize blocks in C++ (GIL released): nothing else can stop it
    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               timeout_s: float = INIT_TIMEOUT_S, local_device_ids: list[int] | None = None,
               heartbeat_timeout_s: int = 100) -> None:
    """jax.distributed.initialize with an explicit address, process count and id.

    Ends the process with one line on stderr (exit code 3) when the run is not formed
    within `timeout_s`: the coordinator does not answer, or some process never arrives."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} is not in [0, {num_processes}); give each of the "
                               f"{num_processes} processes a distinct JAX_PROCESS_ID from 0 to {num_processes - 1}.")
    parse_address(coordinator_address)
    if jax.distributed.is_initialized():
        return
    start = time.monotonic()
    if process_id > 0:
        wait_for_coordinator(coordinator_address, timeout_s)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("JAX_PLATFORM_NAME") == "cpu":
        use_cpu_collectives()
    left = max(timeout_s - (time.monotonic() - start), 1.0)
    timer = _watchdog(left, f"DistributedError: the {num_processes} processes did not all join the coordinator "
                            f"{coordinator_address} within {timeout_s:g} s (this is process {process_id}); start "
                            "every process with the same address and JAX_NUM_PROCESSES, or raise EMO_JAX_INIT_TIMEOUT.")
    options = dict(initialization_timeout=int(left) + 30,  # ours fires first
                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    accepted = inspect.signature(jax.distributed.initialize).parameters
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   **{k: v for k, v in options.items() if k in accepted})
    finally:
        timer.cancel()


def maybe_initialize_distributed() -> None:
    """Initialises jax.distributed on a multi-process launch; a no-op otherwise.

    Explicit launch: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (all
    three). Cloud TPU pods (TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS): jax
    finds everything itself. EMO_JAX_DISTRIBUTED=off disables both."""
    if os.environ.get("EMO_JAX_DISTRIBUTED", "auto") == "off" or jax.distributed.is_initialized():
        return
    timeout = float(os.environ.get("EMO_JAX_INIT_TIMEOUT", INIT_TIMEOUT_S))
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    given = [n for n in names if os.environ.get(n)]
    if given:
        if len(given) != len(names):
            missing = ", ".join(n for n in names if n not in given)
            raise DistributedError(f"{', '.join(given)} set but not {missing}: a multi-process launch needs all "
                                   "three (or none, on a Cloud TPU pod).")
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise DistributedError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers.") from None
        initialize(os.environ["JAX_COORDINATOR_ADDRESS"], count, index, timeout)
    elif "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(initialization_timeout=int(timeout))


def process_batch_rows(mesh: jax.sharding.Mesh, batch_sharding: jax.sharding.Sharding, global_batch: int,
                       seq_len: int) -> int:
    """The rows of the global [global_batch, seq_len] batch that this process's devices hold."""
    indices = batch_sharding.addressable_devices_indices_map((global_batch, seq_len))
    rows = set()
    for index in indices.values():
        rows.update(range(*index[0].indices(global_batch)))
    return len(rows)


def check_processes_fit_mesh(mesh: jax.sharding.Mesh, batch_sharding: jax.sharding.Sharding, global_batch: int,
                             seq_len: int, process_count: int | None = None) -> None:
    """Every process must hold an equal, disjoint share of the batch rows: the loop feeds
    each process's own rows (`make_array_from_process_local_data`) from its data shard."""
    process_count = process_count or jax.process_count()
    if process_count == 1:
        return
    if global_batch % process_count:
        raise DistributedError(f"data.global_batch_size={global_batch} does not divide over the {process_count} "
                               f"processes; use a multiple of {process_count}.")
    rows = process_batch_rows(mesh, batch_sharding, global_batch, seq_len)
    want = global_batch // process_count
    if rows != want:
        shape = dict(mesh.shape)
        raise DistributedError(f"the mesh {shape} does not split the batch over the {process_count} processes "
                               f"(this process's devices hold {rows} of {global_batch} rows, {want} expected): "
                               "give the processes' devices distinct batch shards, e.g. keep the tensor axis "
                               f"within a process (mesh.tensor <= {jax.local_device_count()}).")


def describe(process_count: int | None = None) -> str:
    """'2 processes x 4 devices' (for logs)."""
    count = process_count or jax.process_count()
    return f"{count} process{'es' if count != 1 else ''} x {jax.local_device_count()} devices"

