# Sourced by the launch scripts: preloads jemalloc when it is installed
# (launch/install_allocator.sh), else leaves the system allocator. On CPU a training
# step allocates and frees hundreds of MB of XLA temporaries; glibc returns the large
# blocks to the kernel at every free, so each step page-faults them in again, while
# jemalloc keeps freed pages for the next step (BUILD_NOTES.md, "Issue 16a").
# EMO_ALLOCATOR=system turns it off.
#
# oversize_threshold:0 -- by default jemalloc serves blocks over 8 MiB from an arena
# that purges them as soon as they are freed, which is exactly glibc's behaviour for
# XLA's big temporaries (measured: as many page faults as glibc); 0 turns that arena
# off so the freed blocks are reused by the next step. A MALLOC_CONF already set wins.
EMO_JEMALLOC_CONF="oversize_threshold:0"

emo_find_jemalloc() {
  local lib
  for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 \
             /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2; do
    if [ -f "$lib" ]; then echo "$lib"; return 0; fi
  done
  return 0
}

emo_preload_allocator() {
  if [ "${EMO_ALLOCATOR:-jemalloc}" = "system" ]; then return 0; fi
  local lib
  lib="$(emo_find_jemalloc)"
  if [ -z "$lib" ]; then
    echo "note: jemalloc not found, using the system allocator (bash launch/install_allocator.sh)" >&2
    return 0
  fi
  case ":${LD_PRELOAD:-}:" in *":$lib:"*) return 0 ;; esac
  export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  export MALLOC_CONF="${MALLOC_CONF:-$EMO_JEMALLOC_CONF}"
}
