#!/usr/bin/env bash
# The README main job, on this machine's CPU: set up, build the bundled multi-domain
# corpus (Debian packages -> TFDS array_record + BPE tokenizer), train the tiny EMO
# config for a few minutes, then print how specialised its experts became and plot the loss
# curve, the routing heatmaps and specialisation over training.
#   bash launch/main.sh                      (~10 minutes on 2 cores, first time)
#   bash launch/main.sh train.steps=100      (extra key=value overrides pass through)
# Output: runs/tiny_corpus/{metrics.jsonl, loss_curve.png, specialisation.png, analysis/,
#         tensorboard/, checkpoints/}
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/install_corpus_sources.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
source launch/allocator.sh && emo_preload_allocator  # jemalloc when installed (fewer page faults)
if [ ! -d data_cache/emo_corpus ]; then
  .venv/bin/emo-jax data build
fi
# The domain mix of the batches the model will see (docs/data.md).
.venv/bin/emo-jax data stats --config configs/tiny_corpus.yaml --batches 100
# A finished earlier run would resume at its last step and do nothing: start fresh.
rm -rf runs/tiny_corpus
exec .venv/bin/emo-jax train --config configs/tiny_corpus.yaml "$@"
