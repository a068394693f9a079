#!/usr/bin/env bash
# benchmarks/bench_vs_torch.py with the host allocator the launch scripts use
# (launch/allocator.sh: jemalloc with MALLOC_CONF=oversize_threshold:0 when installed),
# which then serves both frameworks in the one process. Arguments go to the script.
#   bash benchmarks/bench_vs_torch.sh [--shapes S1 S2] [--rounds 3] [--compile]
# jemalloc speeds emo_jax up and slows torch down; glibc the reverse. One allocator fair
# to both (glibc >= 2.35, transparent huge pages in madvise or always mode):
#   EMO_ALLOCATOR=system GLIBC_TUNABLES=glibc.malloc.hugetlb=1 bash benchmarks/bench_vs_torch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/allocator.sh
emo_preload_allocator
PYTHONPATH=. JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} exec "${PYTHON:-.venv/bin/python}" -u benchmarks/bench_vs_torch.py "$@"
