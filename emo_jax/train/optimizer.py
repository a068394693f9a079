"""AdamW with warmup + cosine schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from emo_jax.config import OptimizerConfig

NO_DECAY = ("embedding",)  # weight decay 0.1 except embeddings (docs/algorithm.md#architecture-of-the-released-models)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine to final_lr_ratio * peak."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + decay_steps, end_value=cfg.peak_lr * cfg.final_lr_ratio)


def weight_decay_mask(params) -> dict:
    """True for every parameter that gets weight decay (all but the embeddings)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] not in NO_DECAY for path in flat})


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=weight_decay_mask),
    )


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
