#!/usr/bin/env bash
# benchmarks/bench_vs_torch.py with the host allocator the launch scripts use
# (launch/allocator.sh: jemalloc with MALLOC_CONF=oversize_threshold:0 when installed),
# which then serves both frameworks in the one process. Arguments go to the script.
#   bash benchmarks/bench_vs_torch.sh [--shapes S1 S2] [--rounds 3] [--compile]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/allocator.sh
emo_preload_allocator
PYTHONPATH=. JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} exec "${PYTHON:-.venv/bin/python}" -u benchmarks/bench_vs_torch.py "$@"
