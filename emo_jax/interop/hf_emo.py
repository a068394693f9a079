"""The EMO layout: the released `EmoForCausalLM` checkpoints (model_type "emo").

Tensor names (docs/algorithm.md#architecture-of-the-released-models): `pre_attention_layernorm`,
`pre_feedforward_layernorm`, a router `mlp.gate.weight` [E, D] whose last n_s rows
belong to the shared experts (last, as in emo_jax), and per-expert SwiGLU weights.
As the official model: the routed experts' softmax covers the first E - n_s rows;
the shared experts are weighted by a softmax over their own rows' logits, which is
exactly 1 for a single shared expert (its row is then unused) and emo_jax's
`moe/shared_router` [D, n_s] for two or more. Config fields: `num_experts` (E, shared included), `num_shared_experts`,
`num_experts_per_tok` (k, shared included, as emo_jax's top_k), `norm_topk_prob=false`
and, for pruned models, `num_experts_per_layer` [E_0, ..., E_{L-1}].

The official `EmoForCausalLM` has no QK-norm (it would ignore such weights and compute
other logits), so export refuses `qk_norm: true`, as `--to olmoe` refuses what OLMoE
cannot hold. Import still reads `qk_norm: true` + `self_attn.{q,k}_norm.weight` (over
the full projected width, as OLMoE) from folders written by older emo_jax versions.
Config defaults are the official EmoConfig's: a config.json without
`num_shared_experts` has none. Export always writes `pad_token_id` (the official
default, 100277, lies outside every smaller vocabulary and EmoModel's
`nn.Embedding(..., padding_idx=pad_token_id)` then fails to build).
With one shared expert its unused router row is written as zeros, so such a checkpoint
round-trips exactly in every tensor except that row; with two or more every row is kept.
"""

from __future__ import annotations

from emo_jax.config import ModelConfig
from emo_jax.interop.hf_common import (InteropError, LayerNames, common_hf_fields, common_model_fields,
                                       decoder_sources, require)
from emo_jax.interop.tensor_map import Source

NAME = "emo"
ARCHITECTURE = "EmoForCausalLM"
DEFAULT_EOS_ID = 100257  # EmoConfig's eos_token_id when config.json has none (dolma2's <|endoftext|>)


def layer_names(qk_norm: bool) -> LayerNames:
    return LayerNames(attention_norm="pre_attention_layernorm", feedforward_norm="pre_feedforward_layernorm",
                      qk_norm=qk_norm)


def matches(hf: dict) -> bool:
    return hf.get("model_type") == "emo" or ARCHITECTURE in (hf.get("architectures") or [])


def check_official_features(hf: dict) -> None:
    """Options of the official EmoConfig that emo_jax does not implement: refused, never ignored."""
    for key in ("always_active_experts", "always_active_experts_per_layer", "num_shared_experts_per_layer"):
        if hf.get(key):
            raise InteropError(f"config.json sets {key}={hf[key]!r}, which emo_jax does not implement "
                               "(its shared experts are the last num_shared_experts of every layer).")
    if 0 in (hf.get("num_experts_per_layer") or []):
        raise InteropError("config.json has dense layers (0 in num_experts_per_layer); emo_jax layers are all MoE.")
    ghost = hf.get("ghost_extend_eval", False)
    if ghost is True or str(ghost).strip().lower() in ("true", "1", "yes"):
        raise InteropError("config.json sets ghost_extend_eval (a probe of the official code); emo_jax does not "
                           "implement ghost experts: set it to false.")


def model_fields(hf: dict) -> dict:
    """ModelConfig fields of an EMO config.json (`layer_experts` only for pruned models)."""
    check_official_features(hf)
    fields = common_model_fields(hf)
    n_experts = require(hf, "num_experts")
    per_layer = hf.get("num_experts_per_layer")
    if per_layer is not None:
        per_layer = tuple(int(e) for e in per_layer)
        if len(per_layer) != fields["n_layers"]:
            raise InteropError(f"num_experts_per_layer has {len(per_layer)} entries but num_hidden_layers="
                               f"{fields['n_layers']}; give one expert count per layer.")
    fields.update(qk_norm=bool(hf.get("qk_norm", False)), n_experts=n_experts,
                  n_shared_experts=int(hf.get("num_shared_experts") or 0), top_k=require(hf, "num_experts_per_tok"))
    if per_layer is not None and set(per_layer) != {n_experts}:
        fields["layer_experts"] = per_layer
    return fields


def check_exportable(m: ModelConfig) -> None:
    problems = []
    if m.qk_norm:
        problems.append("qk_norm=true (the official EmoForCausalLM has no q_norm/k_norm and would ignore them)")
    if m.norm_placement != "pre":
        problems.append("norm_placement=post (EmoDecoderLayer is pre-norm)")
    if problems:
        raise InteropError("cannot export to the EMO layout: " + "; ".join(problems) + ".")


def hf_config(m: ModelConfig, expert_counts: tuple[int, ...], dtype: str, eos_id: int | None,
              pad_id: int | None = None) -> dict:
    """pad_id: the pad token id to write (None: eos_id, else 0); always inside the vocabulary."""
    check_exportable(m)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    hf = dict(common_hf_fields(m, dtype), architectures=[ARCHITECTURE], model_type="emo",
              num_experts=m.n_experts, num_shared_experts=m.n_shared_experts, qk_norm=False,
              eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    if len(set(expert_counts)) > 1 or expert_counts[0] != m.n_experts:
        hf["num_experts_per_layer"] = list(expert_counts)
    return hf


def sources(m: ModelConfig, expert_counts: tuple[int, ...]) -> dict[tuple[str, ...], Source]:
    return decoder_sources(m, expert_counts, layer_names(m.qk_norm), router_rows=expert_counts)
