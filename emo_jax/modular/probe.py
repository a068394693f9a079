"""Router logits of every layer, read from one forward pass (MoEBlock sows them)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from emo_jax.config import Config

Array = jax.Array


@functools.lru_cache(maxsize=64)
def _probe(model_config, routing_config, kernels_config) -> Callable:
    from emo_jax.config import Config
    from emo_jax.model import build_model
    config = Config(model=model_config, routing=routing_config, kernels=kernels_config)
    model = build_model(config)

    @jax.jit
    def probe(params, inputs: Array, segment_ids: Array, positions: Array):
        (logits, _), state = model.apply({"params": params}, inputs, segment_ids, positions, train=False,
                                         mutable=["intermediates"])
        layers = state["intermediates"]
        router = tuple(layers[f"layer_{i}"]["moe"]["router_logits"][0] for i in range(model_config.n_layers))
        return logits, router

    return probe


def router_logits(config: Config, params, batch: dict) -> tuple[Array, tuple[Array, ...]]:
    """(LM logits f32[B, S, V], per-layer router logits f32[B, S, N_l]) in eval mode
    (routing.eval_pool), jitted once per model shape."""
    probe = _probe(config.model, config.routing, config.kernels)
    return probe(params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]),
                 jnp.asarray(batch["positions"]))
