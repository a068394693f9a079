"""The OLMoE layout: transformers' `OlmoeForCausalLM` (model_type "olmoe").

Semantics checked against transformers' modeling_olmoe.py (5.x): pre-norm blocks
(`input_layernorm`, `post_attention_layernorm`, both applied *before* their
sublayer), RMSNorm in float32, QK-norm over the whole projected width (q_norm weight
[H * Dh], i.e. emo_jax's `q_norm` over (heads, head_dim)) before the split into heads,
rotate-half RoPE, router softmax over all experts then top-k without renormalisation
(`norm_topk_prob=false`; true is rejected), no shared expert, MHA.
"""

from __future__ import annotations

from emo_jax.config import ModelConfig
from emo_jax.interop.hf_common import (InteropError, LayerNames, common_hf_fields, common_model_fields,
                                       decoder_sources, require)
from emo_jax.interop.tensor_map import Source

NAME = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"
NAMES = LayerNames(attention_norm="input_layernorm", feedforward_norm="post_attention_layernorm", qk_norm=True)


def matches(hf: dict) -> bool:
    return hf.get("model_type") == "olmoe" or ARCHITECTURE in (hf.get("architectures") or [])


def model_fields(hf: dict) -> dict:
    """ModelConfig fields of an OLMoE config.json."""
    fields = common_model_fields(hf)
    heads, d_model = fields["n_heads"], fields["d_model"]
    if heads * fields["head_dim"] != d_model:
        raise InteropError(f"OLMoE needs num_attention_heads * head_dim == hidden_size ({heads} x "
                           f"{fields['head_dim']} != {d_model}): its q_norm spans hidden_size.")
    return dict(fields, qk_norm=True, n_experts=require(hf, "num_experts"), n_shared_experts=0,
                top_k=require(hf, "num_experts_per_tok"))


def check_exportable(m: ModelConfig, expert_counts: tuple[int, ...]) -> None:
    problems = []
    if m.n_shared_experts:
        problems.append(f"n_shared_experts={m.n_shared_experts} (OLMoE has no shared expert; use --to emo)")
    if not m.qk_norm:
        problems.append("qk_norm=false (OLMoE always applies q_norm/k_norm)")
    if m.norm_placement != "pre":
        problems.append("norm_placement=post (OlmoeDecoderLayer is pre-norm)")
    if m.n_heads * m.head_dim != m.d_model:
        problems.append("n_heads * head_dim != d_model (OLMoE's q_norm spans hidden_size)")
    if len(set(expert_counts)) > 1:
        problems.append(f"per-layer expert counts {list(expert_counts)} (OLMoE has one count; use --to emo)")
    if problems:
        raise InteropError("cannot export to the OLMoE layout: " + "; ".join(problems) + ".")


def hf_config(m: ModelConfig, expert_counts: tuple[int, ...], dtype: str, eos_id: int | None,
              pad_id: int | None = None) -> dict:
    check_exportable(m, expert_counts)
    return dict(common_hf_fields(m, dtype), architectures=[ARCHITECTURE], model_type="olmoe",
                num_experts=expert_counts[0], clip_qkv=None, output_router_logits=False,
                router_aux_loss_coef=0.01, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)


def sources(m: ModelConfig, expert_counts: tuple[int, ...]) -> dict[tuple[str, ...], Source]:
    return decoder_sources(m, expert_counts, NAMES, router_rows=expert_counts)
