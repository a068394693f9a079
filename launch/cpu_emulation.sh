#!/usr/bin/env bash
# Any emo-jax command on N emulated CPU devices (default 8): exercises the same
# sharded code paths (data x fsdp x expert meshes, shard_map expert parallelism,
# psum'd load-balance statistics) as a pod slice, on one CPU machine.
#   bash launch/cpu_emulation.sh train --config configs/tiny_corpus.yaml mesh.data=2 mesh.expert=4
#   DEVICES=4 bash launch/cpu_emulation.sh smoke configs/tiny.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu
source launch/allocator.sh && emo_preload_allocator  # jemalloc when installed (fewer page faults)
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES:-8} ${XLA_FLAGS:-}"
exec .venv/bin/emo-jax "$@"
