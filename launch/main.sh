#!/usr/bin/env bash
# Sets up and runs the main job on this machine's CPU: a short training run of the
# tiny EMO config that prints the loss.
#   bash launch/main.sh            (a few minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/emo-jax smoke configs/tiny.yaml "$@"
