"""EMO's effect at CPU scale, as a regression test (marked slow: ~10 minutes on 2 cores).

Trains EMO and its standard-MoE twin for 150 steps (half the shipped
configs/reproduce_cpu.yaml run) on the bundled corpus (`emo-jax data build` must have run;
the test skips otherwise) and checks the direction of the effect with margins measured
over 3 seeds of exactly this run in this setting -- pytest's 8 emulated devices, so the
model trains data-parallel on 8 devices (BUILD_NOTES.md, "Reproduction"):
- pruned to K = E/8 selected experts, EMO's held-out loss rises by less than
  MAX_DELTA_RATIO times the standard MoE's;
- EMO's centred domain cosine (final checkpoint) is below the standard MoE's in the mean
  over layers by at least MIN_COSINE_GAP.
Run: `bash launch/test.sh -m slow tests/test_reproduction_slow.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emo_jax.config import load_config
from emo_jax.modular import reproduce

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data_cache"
STEPS = 150  # measured: at 100 steps the effect is not yet robust (ratio 0.53 in one run)
MAX_DELTA_RATIO = 0.5  # measured over seeds 0-2 on 8 devices: 0.22, 0.11, 0.18
MIN_COSINE_GAP = 0.15  # measured: 0.33, 0.35, 0.30 over the same seeds

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("full_optimization")  # the margins were measured as training compiles
def test_emo_prunes_better_and_specialises_more_than_the_standard_moe(tmp_path):
    if not any(DATA.glob("emo_corpus/*/*/dataset_info.json")):
        pytest.skip("the bundled corpus is not built: run `emo-jax data build` first")
    config = load_config(ROOT / "configs" / "reproduce_cpu.yaml",
                         [f"data.data_dir={DATA}", f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}",
                          f"train.run_dir={tmp_path}"])
    e = config.model.n_experts
    result = reproduce.run(config, tmp_path, reproduce.Options(keep=(e, e // 8), seeds=1, random_seeds=1,
                                                                    eval_batches=2, analysis_docs=8),
                           log=lambda s: None)
    head = result["headline"]
    assert head["K"] == e // 8
    assert head["stdmoe_selected_delta"] > 0, head
    assert head["emo_selected_delta"] < MAX_DELTA_RATIO * head["stdmoe_selected_delta"], head
    gap = np.mean(head["stdmoe_centered_cosine"]) - np.mean(head["emo_centered_cosine"])
    assert gap > MIN_COSINE_GAP, head
