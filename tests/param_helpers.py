"""Test helpers for models given as parameter trees: random parameters without compiling
the model, and a jitted forward pass (eager op-by-op dispatch is slow on CPU)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.model import build_model
from emo_jax.artifact import abstract_params


def random_params(config, seed: int = 0, std: float = 0.5) -> dict:
    """Normal(0, std) values in the model's parameter shapes and dtypes (norms included)."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(abstract_params(config))
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, std, a.shape).astype(a.dtype)), abstract)


@functools.lru_cache(maxsize=16)
def _forward(config):
    model = build_model(config)
    return jax.jit(lambda p, t, s: model.apply({"params": p}, t, s)[0])


def logits(config, params, tokens, segment_ids) -> np.ndarray:
    """float32 logits [B, S, V] of tokens/segment_ids [B, S] (no positions: per-document)."""
    return np.asarray(_forward(config)(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(segment_ids, jnp.int32)))


def save_run_checkpoint(run_dir, config, params, step: int = 1, opt_state=None):
    """A training run directory (run_dir/checkpoints/<step>) as `emo-jax train` writes it:
    params, a real AdamW state (or `opt_state`), the step, an empty data state, the config."""
    from emo_jax.train import make_optimizer
    from emo_jax.train.checkpoint import Checkpointer
    from emo_jax.train.step import TrainState
    if opt_state is None:
        opt_state = make_optimizer(config.optimizer, config.train.steps).init(params)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
    checkpointer = Checkpointer(f"{run_dir}/checkpoints", every=1, keep=100)
    try:
        checkpointer.save(step, state, {}, config, seed=0, force=True)
    finally:
        checkpointer.close()
    return run_dir
