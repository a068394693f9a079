#!/usr/bin/env bash
# Training on one GPU machine (one or more local GPUs, one process).
#   bash launch/gpu.sh --config configs/tiny_corpus.yaml [key=value ...]
# Needs an NVIDIA driver; installs jax[cuda12] into .venv on first use.
# Logs: stdout and RUN_DIR/metrics.jsonl; TensorBoard: tensorboard --logdir RUN_DIR/tensorboard
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if ! .venv/bin/python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  .venv/bin/python -m pip install -q "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
fi
# Let XLA use most of the GPU memory, and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
exec .venv/bin/emo-jax train "$@"
