"""Parameter counts from shapes alone (jax.eval_shape: nothing is allocated)."""

from __future__ import annotations

import dataclasses
import math

from flax import traverse_util

from emo_jax.artifact import abstract_params
from emo_jax.config import Config

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


def count_params(config: Config) -> ParamCounts:
    flat = traverse_util.flatten_dict(abstract_params(config))
    total = embedding = experts = active_experts = 0
    for path, value in flat.items():
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
