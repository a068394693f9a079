"""Golden numbers: one training step of a fixed tiny config, so any change to what the
model computes (routing, pools, losses, kernels, optimizer, init) is seen.

The config is configs/tiny.yaml (random document pools, 1 shared expert, global-batch
load balance) with 2 micro-batches and no warmup, on a fixed synthetic batch with
some padding, on one CPU device, float32, matmul precision "highest" (tests/conftest.py).

Tolerance: rtol 2e-5. XLA:CPU is deterministic for one build and machine, but the
order of float32 reductions may differ between jax/XLA versions and CPU instruction
sets (a few 1e-7 relative), so bitwise equality would fail for no reason. Changes to
the algorithm move the numbers far more (measured): loss.lb_weight 0.1 -> 0.11 moves
the loss by 1.7e-3 relative, routing.pool_max 8 -> 7 moves router_z by 1e-1 and the
load balance by 1e-2. The reference and blocked MoE backends give identical numbers
here. Not covered: Adam's b1/b2 (the first Adam step does not depend on them).
Recorded on jax 0.10.2, XLA:CPU.

To regenerate after an intended change: `python tests/test_golden.py` prints the new
dict; paste it over GOLDEN below and say in the commit why the numbers moved.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.micro_batches=2", "train.steps=10", "optimizer.warmup_steps=0", "data.global_batch_size=4",
             "data.seq_len=64"]
RTOL = 2e-5

GOLDEN = {
    'loss': 6.375,
    'cross_entropy': 6.2646942138671875,
    'load_balance': 1.0685844421386719,
    'router_z': 3.056274652481079,
    'output_z': 39.07978057861328,
    'grad_norm': 1.0347809791564941,
    'learning_rate': 0.003000000026077032,
    'mean_pool_size': 5.6875,
    'param_norm_change': 0.04592323303222656,
}


def one_step_metrics() -> dict[str, float]:
    import jax

    from emo_jax.config import load_config
    from emo_jax.model import build_model
    from emo_jax.synthetic import packed_batch
    from emo_jax.train import init_train_state, learning_rate_schedule, make_optimizer, make_train_step
    from emo_jax.train.optimizer import global_norm

    config = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES)
    model = build_model(config)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    state = jax.jit(lambda key: init_train_state(model, optimizer, config, key))(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, optimizer, config, learning_rate_schedule(config.optimizer, 10)))
    batch = packed_batch(np.random.default_rng(0), 4, 64, config.model.vocab_size, pad_fraction=0.125)
    before = float(global_norm(state.params))
    state, metrics = step(state, batch, jax.random.PRNGKey(1))  # no warmup: the step moves the parameters
    out = {k: float(metrics[k]) for k in ("loss", "cross_entropy", "load_balance", "router_z", "output_z",
                                           "grad_norm", "learning_rate", "mean_pool_size")}
    out["param_norm_change"] = float(global_norm(state.params)) - before
    return out


@pytest.mark.parametrize("key", ["loss", "cross_entropy", "load_balance", "router_z", "output_z", "grad_norm",
                                 "learning_rate", "mean_pool_size", "param_norm_change"])
def test_one_training_step_matches_the_recorded_numbers(golden_run, key):
    assert golden_run[key] == pytest.approx(GOLDEN[key], rel=RTOL, abs=1e-9), (key, golden_run[key], GOLDEN[key])


@pytest.fixture(scope="module")
def golden_run() -> dict[str, float]:
    return one_step_metrics()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    print("GOLDEN = {")
    for key, value in one_step_metrics().items():
        print(f"    {key!r}: {value!r},")
    print("}")
