"""Physical pruning: keep a subset of each layer's experts
(docs/algorithm.md#selective-expert-use-and-pruning).

Layer l keeps the routed experts `keep[l]` (indices into its routed experts, kept in
ascending order) and always its shared experts, the last n_s entries of the [E, D, H]
expert stacks. The router keeps only the kept experts' columns, so its softmax
renormalises over them and tokens take top-k_r among them. Keeping every expert in
order gives back the same arrays, hence exactly the same model.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from emo_jax.config import Config, ConfigError, ModelConfig, replace
from emo_jax.modular import ModularError

Keep = Sequence[Sequence[int] | None]  # per layer: kept routed expert indices, None = all


def parse_counts(text: str | int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """'8' or 8 -> (8,) * L; '8,8,4,4' -> per layer."""
    if isinstance(text, int):
        return (text,) * n_layers
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ModularError(f"K={text!r} must be an integer or comma-separated integers (one per layer).") from None
    else:
        values = [int(v) for v in text]
    if len(values) == 1:
        return (values[0],) * n_layers
    if len(values) != n_layers:
        raise ModularError(f"K={text!r} gives {len(values)} counts but the model has {n_layers} layers; "
                           "give one K, or one per layer.")
    return tuple(values)


def check_counts(m: ModelConfig, counts: Sequence[int]) -> None:
    """K per layer must lie in [top_k, experts the layer holds]; K counts the shared ones."""
    for layer, (k, have) in enumerate(zip(counts, m.expert_counts)):
        if k > have:
            raise ModularError(f"K={k} for layer {layer} is larger than the {have} experts it holds; "
                               f"choose K <= {have} (K counts the {m.n_shared_experts} shared expert(s)).")
        if k < m.top_k:
            raise ModularError(f"K={k} for layer {layer} is below model.top_k={m.top_k}: every token uses "
                               f"{m.routed_top_k} routed + {m.n_shared_experts} shared experts, so keep at "
                               f"least K={m.top_k}.")


def expert_indices(m: ModelConfig, layer: int, routed_keep: Sequence[int] | None) -> np.ndarray:
    """Rows of layer `layer`'s [E_l, ...] stacks to keep: routed ones (ascending) + shared."""
    e = m.expert_counts[layer]
    n_r = e - m.n_shared_experts
    if routed_keep is None:
        return np.arange(e)
    routed = np.asarray(sorted(int(i) for i in routed_keep), np.int64)
    if routed.size and (routed[0] < 0 or routed[-1] >= n_r or len(set(routed.tolist())) != routed.size):
        raise ModularError(f"layer {layer}: kept routed experts must be distinct indices in [0, {n_r}).")
    return np.concatenate([routed, np.arange(n_r, e)])


def prune_params(params: Any, m: ModelConfig, keep: Keep) -> Any:
    """Params with each layer's unkept experts and router columns removed (new arrays)."""
    if len(keep) != m.n_layers:
        raise ModularError(f"a selection for {len(keep)} layers does not fit a model with {m.n_layers}.")
    out = dict(params)
    for layer, routed_keep in enumerate(keep):
        if routed_keep is None:
            continue
        rows = expert_indices(m, layer, routed_keep)
        moe = dict(params[f"layer_{layer}"]["moe"])
        n_r = m.expert_counts[layer] - m.n_shared_experts
        moe["router"] = moe["router"][:, rows[rows < n_r]]
        for name in ("w_gate", "w_up", "w_down"):
            moe[name] = moe[name][rows]
        out[f"layer_{layer}"] = dict(params[f"layer_{layer}"], moe=moe)
    return out


def pruned_counts(m: ModelConfig, keep: Keep) -> tuple[int, ...]:
    return tuple(have if k is None else len(k) + m.n_shared_experts for have, k in zip(m.expert_counts, keep))


def pruned_config(config: Config, keep: Keep, **sections: Any) -> Config:
    """The config of the pruned model: model.layer_experts set; an expert mesh axis that
    no longer divides the counts is dropped (mesh.expert=1, data fills the devices)."""
    counts = pruned_counts(config.model, keep)
    mesh = dict(vars(config.mesh))
    if mesh["expert"] > 1 and any(c % mesh["expert"] for c in counts):
        mesh["expert"] = 1
        if -1 not in mesh.values():
            mesh["data"] = -1
    try:
        return replace(config, model={"layer_experts": list(counts)}, mesh=mesh, **sections)
    except ConfigError as err:
        raise ModularError(f"the pruned config is invalid: {err}") from None


def prune(config: Config, params: Any, keep: Keep, **sections: Any) -> tuple[Config, Any]:
    """(pruned config, pruned params)."""
    return pruned_config(config, keep, **sections), prune_params(params, config.model, keep)


def param_bytes(params: Any) -> dict[str, int]:
    """Bytes of all parameters and of the expert weights."""
    total = experts = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += size
        if getattr(path[-1], "key", None) in ("w_gate", "w_up", "w_down"):
            experts += size
    return {"total": total, "experts": experts}
