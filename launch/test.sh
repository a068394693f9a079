#!/usr/bin/env bash
# Sets up and runs the default test suite on 8 emulated CPU devices.
#   bash launch/test.sh            (extra pytest arguments pass through, e.g. -m slow)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
source launch/allocator.sh && emo_preload_allocator  # jemalloc when installed (fewer page faults)
# Two pytest workers (pytest-xdist), one test file each at a time: XLA compiles on one
# core, so two processes keep a 2-core machine busy (~9 min instead of ~17).
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
