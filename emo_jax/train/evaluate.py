"""Validation: held-out cross entropy per domain (the pool mode of routing.eval_pool)."""

from __future__ import annotations

from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np



def make_eval_step(model: nn.Module, num_domains: int) -> Callable:
    """(params, batch) -> (CE sums f32[num_domains], token counts f32[num_domains])."""

    def eval_step(params, batch):
        logits, _ = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                                train=False)
        logits = logits.astype(jnp.float32)
        token_ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        mask = batch["loss_mask"].astype(jnp.float32)
        domain = jnp.where(batch["domain_ids"] >= 0, batch["domain_ids"], num_domains)
        sums = jax.ops.segment_sum((token_ce * mask).reshape(-1), domain.reshape(-1), num_segments=num_domains + 1)
        counts = jax.ops.segment_sum(mask.reshape(-1), domain.reshape(-1), num_segments=num_domains + 1)
        return sums[:num_domains], counts[:num_domains]

    return eval_step


def evaluate(eval_step: Callable, params, batches: Iterable[dict], domains: tuple[str, ...],
             to_device: Callable[[dict], dict]) -> dict[str, float]:
    """Mean CE and perplexity per domain and overall, over the given batches."""
    sums = np.zeros(len(domains))
    counts = np.zeros(len(domains))
    for batch in batches:
        s, c = jax.device_get(eval_step(params, to_device(batch)))
        sums += s
        counts += c
    out = {}
    for name, s, c in zip(domains, sums, counts):
        if c > 0:
            out[f"loss/{name}"] = float(s / c)
    total = float(sums.sum() / max(counts.sum(), 1.0))
    out["loss"] = total
    out["perplexity"] = float(np.exp(min(total, 50.0)))
    out["tokens"] = float(counts.sum())
    return out

