"""AdamW with warmup + cosine schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from emo_jax.config import OptimizerConfig

NO_DECAY = ("embedding",)  # weight decay 0.1 except embeddings (docs/algorithm.md#architecture-of-the-released-models)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine to final_lr_ratio * peak."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + decay_steps, end_value=cfg.peak_lr * cfg.final_lr_ratio)


def weight_decay_mask(params):
    """True for every parameter that gets weight decay (all but the embeddings), for any
    pytree of parameters: a Linen params dict, or an nnx State (whose leaf paths end in
    the Variable's `.value`)."""
    def decays(path, _) -> bool:
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
        return not names or names[-1] not in NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=weight_decay_mask),
    )


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
