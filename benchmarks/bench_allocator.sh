#!/usr/bin/env bash
# Training-step time, minor page faults and system time per step under each host
# allocator, one process per allocator, in alternating repeats (benchmarks/bench_step.py,
# issue 16's S2 shape, EMO pool routing).
#   bash benchmarks/bench_allocator.sh                    (~15 minutes on 2 cores)
#   JEMALLOC=/path/libjemalloc.so.2 TCMALLOC=/path/libtcmalloc_minimal.so.4 REPEATS=1 bash benchmarks/bench_allocator.sh
#   ALLOCATORS="system jemalloc_tuned glibc_hugetlb" bash benchmarks/bench_allocator.sh
# Allocators: system (glibc defaults), glibc_tuned (glibc with MALLOC_MMAP_THRESHOLD_ and
# MALLOC_TRIM_THRESHOLD_ raised so freed blocks stay in the heap; glibc caps the mmap
# threshold at 32 MiB, larger blocks are still mapped and unmapped), glibc_hugetlb (glibc
# >= 2.35 with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: its mappings are madvised for
# transparent huge pages, one fault per 2 MiB instead of per 4 KiB), jemalloc and
# tcmalloc (LD_PRELOAD; skipped when not found); jemalloc_tuned is jemalloc with the
# MALLOC_CONF of launch/allocator.sh (no separate arena that frees blocks over 8 MiB
# at once). Extra arguments go to bench_step.py.
set -u
cd "$(dirname "$0")/.."
source launch/allocator.sh
PY=${PYTHON:-.venv/bin/python}
JEMALLOC=${JEMALLOC:-$(emo_find_jemalloc)}
TCMALLOC=${TCMALLOC:-$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -1)}
for repeat in $(seq "${REPEATS:-2}"); do
  for alloc in ${ALLOCATORS:-system glibc_tuned glibc_hugetlb jemalloc jemalloc_tuned tcmalloc}; do
    env_args=(LD_PRELOAD=)
    case $alloc in
      glibc_tuned) env_args+=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824) ;;
      glibc_hugetlb) env_args+=(GLIBC_TUNABLES=glibc.malloc.hugetlb=1) ;;
      jemalloc) [ -n "$JEMALLOC" ] || continue; env_args=(LD_PRELOAD="$JEMALLOC") ;;
      jemalloc_tuned) [ -n "$JEMALLOC" ] || continue; env_args=(LD_PRELOAD="$JEMALLOC" MALLOC_CONF="$EMO_JEMALLOC_CONF") ;;
      tcmalloc) [ -n "$TCMALLOC" ] || continue; env_args=(LD_PRELOAD="$TCMALLOC") ;;
    esac
    echo "== repeat $repeat: $alloc"
    env "${env_args[@]}" JAX_PLATFORMS=cpu "$PY" benchmarks/bench_step.py --variants pool --rounds 2 --steps 2 "$@" \
      | tail -1
  done
done
