"""Validation: held-out cross entropy per domain (the pool mode of routing.eval_pool) and
the routing specialisation measures, on the run's fixed sample (train/eval_sample.py)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import specialisation
from emo_jax.config import Config
from emo_jax.model.moe_block import pool_sizes_for


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


def make_routing_step(model: nn.Module, config: Config) -> Callable:
    """(params, batch of one document per row) -> per layer (mean router probabilities
    f32[B, N_l], routed assignments per expert f32[B, N_l]), in eval mode."""
    n_layers, routed_top_k = config.model.n_layers, config.model.routed_top_k

    def routing_step(params, batch):
        _, state = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                               train=False, mutable=["intermediates"])
        seg = batch["segment_ids"]
        pools = pool_sizes_for(config.routing, False, None, seg.shape[0], seg.shape[1] + 1)
        out = []
        for layer in range(n_layers):
            logits = state["intermediates"][f"layer_{layer}"]["moe"]["router_logits"][0]
            mean_probs, _, counts = specialisation.document_routing(logits, seg, routed_top_k, pools)
            out.append((mean_probs, counts))
        return tuple(out)

    return routing_step


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathered across processes if needed)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate(eval_step: Callable, params, batches: Iterable[dict], domains: tuple[str, ...],
             to_device: Callable[[dict], dict]) -> dict[str, float]:
    """Mean CE and perplexity per domain and overall, over the given batches."""
    sums = np.zeros(len(domains))
    counts = np.zeros(len(domains))
    for batch in batches:
        s, c = eval_step(params, to_device(batch))
        sums += to_host(s)
        counts += to_host(c)
    out = {}
    for name, s, c in zip(domains, sums, counts):
        if c > 0:
            out[f"loss/{name}"] = float(s / c)
    total = float(sums.sum() / max(counts.sum(), 1.0))
    out["loss"] = total
    out["perplexity"] = float(np.exp(min(total, 50.0)))
    out["tokens"] = float(counts.sum())
    return out


def routing_summary(routing_step: Callable, params, batches: Iterable[dict], doc_domains: np.ndarray,
                    domains: tuple[str, ...], to_device: Callable[[dict], dict]) -> dict[str, Any]:
    """specialisation.summarise over batches of one document per row (padding rows last)."""
    per_layer: list[dict[str, list]] | None = None
    for batch in batches:
        outputs = routing_step(params, to_device(batch))
        if per_layer is None:
            per_layer = [{"mean_probs": [], "counts": []} for _ in outputs]
        for acc, (mean_probs, counts) in zip(per_layer, outputs):
            acc["mean_probs"].append(to_host(mean_probs))
            acc["counts"].append(to_host(counts))
    rows = len(doc_domains)
    stacked = [{k: np.concatenate(v)[:rows] for k, v in acc.items()} for acc in per_layer or []]
    return specialisation.summarise(stacked, doc_domains, domains)


class Evaluator:
    """The run's periodic validation: built once (sample + jitted steps), called per eval."""

    def __init__(self, config: Config, model: nn.Module, to_device: Callable[[dict], dict]):
        from emo_jax.train import batches as batch_sources
        self.sample = batch_sources.eval_sample(config)
        self.to_device = to_device
        self.loss_step = jax.jit(make_eval_step(model, len(self.sample.domains)))
        self.routing_step = jax.jit(make_routing_step(model, config))

    def __call__(self, params) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(loss metrics, specialisation summary or None when the sample has no routing rows)."""
        from emo_jax.train.eval_sample import host_rows
        s = self.sample
        result = evaluate(self.loss_step, params, map(host_rows, s.loss_batches), s.domains, self.to_device)
        if not s.routing_batches:
            return result, None
        summary = routing_summary(self.routing_step, params, map(host_rows, s.routing_batches),
                                  s.routing_domains, s.domains, self.to_device)
        result.update({f"specialisation/{k}": v for k, v in specialisation.scalar_metrics(summary).items()})
        return result, summary
