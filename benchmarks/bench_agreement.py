"""Cost of the cross-process stop agreement (parallel/agreement.py), as a table.

Two processes on this machine, 4 CPU devices each (run both lines, e.g. in two shells):

  for i in 0 1; do JAX_COORDINATOR_ADDRESS=127.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    .venv/bin/python benchmarks/bench_agreement.py & done; wait

Measures one agreement dispatched and read at once (blocking), and the loop's way:
dispatched, then read one iteration later. Process 0 prints the table.
"""

from __future__ import annotations

import statistics
import time


def main(repeats: int = 200) -> None:
    from emo_jax.parallel.distributed import maybe_initialize_distributed
    maybe_initialize_distributed()
    import jax
    from emo_jax.parallel.agreement import Agreement
    agreement = Agreement(1, force_collective=True)
    agreement([0])  # compile
    blocking = []
    for _ in range(repeats):
        start = time.perf_counter()
        agreement([0])
        blocking.append(time.perf_counter() - start)
    start = time.perf_counter()
    handle = agreement.start([0])
    for _ in range(repeats):
        previous, handle = handle, agreement.start([0])
        agreement.result(previous)
    overlapped = (time.perf_counter() - start) / repeats
    if jax.process_index() == 0:
        print(f"\n{jax.process_count()} processes x {jax.local_device_count()} {jax.devices()[0].platform} devices, "
              f"{repeats} agreements")
        print("| agreement | median ms | mean ms |")
        print("|---|---|---|")
        print(f"| dispatch + read (blocking) | {1e3 * statistics.median(blocking):.3f} | "
              f"{1e3 * statistics.mean(blocking):.3f} |")
        print(f"| read one iteration later | - | {1e3 * overlapped:.3f} |")


if __name__ == "__main__":
    main()
