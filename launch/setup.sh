#!/usr/bin/env bash
# Creates .venv (if missing) and installs emo_jax with its test and interop extras
# (interop = torch CPU + transformers, for the Hugging Face parity tests), and jemalloc
# for the other launch scripts to preload (launch/install_allocator.sh: optional, never
# fails). Idempotent.
#   bash launch/setup.sh          (~1 minute on a fresh machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,interop]"
bash launch/install_allocator.sh || true
