"""Expert selection per layer, greedy from layer 0 upward
(docs/algorithm.md#selective-expert-use-and-pruning).

Layer l is scored by running the calibration batches through the model whose
layers < l are already pruned to their chosen subsets: the score of routed expert i
is the mean over non-padding tokens of its router softmax probability p_t(i)
("probability", the paper's rule) or of how often it is among a token's top-k_r
("frequency"). The top K - n_s routed experts are kept, plus the shared ones. Ties
go to the lower index, so the choice is a deterministic function of the params and
the calibration text. `random_selection` is the random-subset baseline.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import Config
from emo_jax.modular import ModularError, probe
from emo_jax.modular.prune import check_counts, prune

Array = jax.Array
METHODS = ("probability", "frequency", "random")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Kept routed experts per layer (ascending indices into that layer's routed experts)."""

    keep: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]  # K per layer, shared experts included
    method: str
    scores: tuple[tuple[float, ...], ...] | None = None  # per layer, every routed expert
    source: str = ""  # what the calibration text was

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Selection":
        d = json.loads(text)
        return cls(keep=tuple(tuple(k) for k in d["keep"]), counts=tuple(d["counts"]), method=d["method"],
                   scores=None if d.get("scores") is None else tuple(tuple(s) for s in d["scores"]),
                   source=d.get("source", ""))


def score_sums(router_logits: Array, valid: Array, routed_top_k: int, method: str) -> Array:
    """Per-expert score summed over valid tokens. f32[B, S, N], bool[B, S] -> f32[N]."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    if method == "frequency":
        _, ids = jax.lax.top_k(probs, routed_top_k)
        probs = jnp.sum(jax.nn.one_hot(ids, probs.shape[-1], dtype=jnp.float32), axis=-2)
    return jnp.sum(jnp.where(valid[..., None], probs, 0.0), axis=(0, 1))


def top_experts(scores: np.ndarray, n_keep: int) -> tuple[int, ...]:
    """Indices of the n_keep best scores (ties: lower index first), ascending."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return tuple(sorted(int(i) for i in order[:n_keep]))


def layer_scores(config: Config, params: Any, batches: Sequence[dict], layer: int, method: str) -> np.ndarray:
    """Mean score of every routed expert of `layer` over the batches' non-padding tokens."""
    total, tokens = 0.0, 0.0
    for batch in batches:
        _, router = probe.router_logits(config, params, batch)
        valid = jnp.asarray(batch["segment_ids"]) > 0
        total = total + score_sums(router[layer], valid, config.model.routed_top_k, method)
        tokens += float(np.sum(batch["segment_ids"] > 0))
    if tokens == 0:
        raise ModularError("the calibration batches hold no tokens; give non-empty calibration text.")
    return np.asarray(jax.device_get(total)) / tokens


def greedy_selection(config: Config, params: Any, batches: Sequence[dict], counts: Sequence[int],
                     method: str = "probability", source: str = "") -> Selection:
    """Chooses layer l's experts with layers < l already pruned to their choices."""
    if method not in ("probability", "frequency"):
        raise ModularError(f"unknown selection method {method!r}; use 'probability' or 'frequency'.")
    m = config.model
    check_counts(m, counts)
    keep: list[tuple[int, ...] | None] = [None] * m.n_layers
    all_scores = []
    for layer in range(m.n_layers):
        partial_config, partial_params = prune(config, params, keep)
        scores = layer_scores(partial_config, partial_params, batches, layer, method)
        keep[layer] = top_experts(scores, counts[layer] - m.n_shared_experts)
        all_scores.append(tuple(float(s) for s in scores))
    return Selection(keep=tuple(keep), counts=tuple(counts), method=method, scores=tuple(all_scores), source=source)


def random_selection(config: Config, counts: Sequence[int], seed: int) -> Selection:
    """K - n_s routed experts per layer drawn uniformly without replacement (seeded per layer)."""
    m = config.model
    check_counts(m, counts)
    keep = []
    for layer, (k, n_r) in enumerate(zip(counts, m.routed_counts)):
        rng = np.random.default_rng([seed, layer])
        keep.append(tuple(sorted(int(i) for i in rng.choice(n_r, size=k - m.n_shared_experts, replace=False))))
    return Selection(keep=tuple(keep), counts=tuple(counts), method="random", source=f"seed {seed}")
