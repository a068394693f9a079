#!/usr/bin/env bash
# The accelerator check (docs/accelerator_check.md), one command on a GPU machine, under 8 minutes:
# every GPU kernel (Pallas grouped matmul, dispatch/combine, flash attention) lowered, run and
# compared with its reference, then the kernel, MoE-layer, attention and training-step benchmarks
# at EMO's layer shape with MFU.
#   bash launch/accelerator_check.sh                        results in $OUT, else ./accelerator_check_out
#   bash launch/accelerator_check.sh --out DIR [--budget SECONDS] [--sections env correctness ...]
#   bash launch/accelerator_check.sh --tiny --interpret     the same code at tiny shapes on a CPU
#   bash launch/accelerator_check.sh --dry-run | --help
# Writes DIR/accelerator_check.json (every result) and DIR/accelerator_check.log (the output).
# Exit code: 0 all passed, 1 a correctness check failed (or did not finish), 3 another section failed.
# Python: $PYTHON if set, else the first of .venv/bin/python and python3 that has jax's CUDA
# plugin, else .venv/bin/python if present, else python3. Installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

has_cuda_jax() {
  "$1" -c "import importlib.util as u, sys; sys.exit(not any(u.find_spec(m) for m in \
('jax_plugins.xla_cuda13', 'jax_plugins.xla_cuda12', 'jax_cuda13_plugin', 'jax_cuda12_plugin')))" 2>/dev/null
}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda_jax "$candidate"; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# One section runs at a time, each in its own process: let it take most of the GPU's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/emo_jax_accelcheck_cache}

for arg in "$@"; do
  case "$arg" in
    -h|--help|--dry-run) exec "$PY" -m emo_jax.accelcheck "$@" ;;
  esac
done

DIR=${OUT:-accelerator_check_out}
given=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "--out" ]; then DIR=$arg; given=1; fi
  case "$arg" in --out=*) DIR=${arg#--out=}; given=1 ;; esac
  prev=$arg
done
extra=()
if [ -z "$given" ]; then extra=(--out "$DIR"); fi
mkdir -p "$DIR"
echo "accelerator check: $PY ($("$PY" --version 2>&1)), results in $DIR" | tee "$DIR/accelerator_check.log"
"$PY" -m emo_jax.accelcheck ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee -a "$DIR/accelerator_check.log"
exit "${PIPESTATUS[0]}"
