"""Parameter counts from shapes alone (jax.eval_shape: nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from emo_jax.config import Config
from emo_jax.model import build_model

EMBEDDING_PARAMS = ("embedding", "lm_head")
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # input embedding + untied LM head
    experts: int  # all expert weights (routed + shared)
    active: int  # parameters one token uses: shared + top-k experts, not the others

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def abstract_params(config: Config) -> dict:
    """Shapes and dtypes of the parameters, without allocating them."""
    model = build_model(config)
    tokens = jax.ShapeDtypeStruct((1, min(8, config.model.max_seq_len)), jnp.int32)
    variables = jax.eval_shape(
        lambda key, tok: model.init({"params": key, "routing": key}, tok, train=False),
        jax.random.PRNGKey(0), tokens)
    return variables["params"]


def count_params(config: Config) -> ParamCounts:
    params = abstract_params(config)
    flat = traverse_util.flatten_dict(jax.tree.map(lambda p: p, params, is_leaf=lambda x: hasattr(x, "names")))
    total = embedding = experts = active_experts = 0
    for path, leaf in flat.items():
        value = getattr(leaf, "value", leaf)
        size = math.prod(value.shape)
        total += size
        if path[-1] in EMBEDDING_PARAMS:
            embedding += size
        if path[-1] in EXPERT_PARAMS:
            experts += size
            # [E_l, ...]: each layer's own expert count (pruned layers hold fewer).
            active_experts += size // value.shape[0] * config.model.top_k
    return ParamCounts(total=total, embedding=embedding, experts=experts,
                       active=total - experts + active_experts)


def format_counts(name: str, counts: ParamCounts) -> str:
    rows = [
        ("total", counts.total),
        ("total non-embedding", counts.total_non_embedding),
        ("active", counts.active),
        ("active non-embedding", counts.active_non_embedding),
        ("embedding (+ untied head)", counts.embedding),
        ("experts (all)", counts.experts),
    ]
    lines = [f"{name}"] + [f"  {label:<26} {value:>16,d}  ({value / 1e9:6.3f} B)" for label, value in rows]
    return "\n".join(lines)
