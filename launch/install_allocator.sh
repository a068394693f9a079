#!/usr/bin/env bash
# Installs jemalloc (Debian/Ubuntu package libjemalloc2) for launch/allocator.sh to
# preload: XLA:CPU allocates and frees a training step's temporaries every step, and
# glibc hands large freed blocks back to the kernel, so every step faults them in again
# (BUILD_NOTES.md, "Issue 16a": measured page faults and step times).
#   sudo bash launch/install_allocator.sh        (seconds; idempotent; never fails)
# Without root, apt or the package, it says so and exits 0: emo_jax then runs on
# the system allocator, only slower on CPU.
set -u
source "$(dirname "$0")/allocator.sh"
if [ -n "$(emo_find_jemalloc)" ]; then
  echo "jemalloc ready: $(emo_find_jemalloc)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "note: not root, jemalloc not installed (sudo apt-get install libjemalloc2 to speed up CPU training)"
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get; install jemalloc (libjemalloc.so.2) with your package manager to speed up CPU training"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show libjemalloc2 >/dev/null 2>&1; then
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
fi
$SUDO apt-get install -y -qq --no-install-recommends libjemalloc2 >/dev/null 2>&1 \
  || echo "note: apt-get install libjemalloc2 failed; running on the system allocator"
if [ -n "$(emo_find_jemalloc)" ]; then echo "jemalloc ready: $(emo_find_jemalloc)"; fi
exit 0
