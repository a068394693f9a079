"""Held-out cross entropy and perplexity of a model on packed batches."""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import Config


@functools.lru_cache(maxsize=64)
def _eval_step(model_config, routing_config, kernels_config):
    from emo_jax.model import build_model
    from emo_jax.train.evaluate import make_eval_step
    model = build_model(Config(model=model_config, routing=routing_config, kernels=kernels_config))
    return jax.jit(make_eval_step(model, 1))


def heldout_loss(config: Config, params: Any, batches: Iterable[dict]) -> dict[str, float]:
    """Mean token CE (nats), perplexity and token count over the batches, in eval mode
    (routing.eval_pool: none = no pool, fixed = a pool of eval_pool_size per document)."""
    step = _eval_step(config.model, config.routing, config.kernels)
    total, count = 0.0, 0.0
    for batch in batches:
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        b["domain_ids"] = jnp.where(b["segment_ids"] > 0, 0, -1)
        s, c = jax.device_get(step(params, b))
        total += float(np.sum(s))
        count += float(np.sum(c))
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
