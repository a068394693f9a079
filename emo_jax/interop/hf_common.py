"""What the OLMoE and EMO Hugging Face layouts share: config.json fields, the decoder's
tensor names and their map onto the emo_jax parameter tree.

Both layouts store a Llama-style decoder (torch Linear weights [out, in], per-expert
SwiGLU weights `mlp.experts.{e}.{gate,up,down}_proj.weight`, a router
`mlp.gate.weight` [rows, D]); they differ in the norm names, QK-norm, the shared
expert and the config fields (see hf_olmoe.py and hf_emo.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from emo_jax.config import ModelConfig
from emo_jax.interop.tensor_map import FromHF, Source, Stacked, identity, transposed

CONFIG_FILE = "config.json"


class InteropError(ValueError):
    """A checkpoint or model that cannot be converted, naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class LayerNames:
    """HF tensor names of one decoder layer (prefix `model.layers.{l}.`)."""

    attention_norm: str
    feedforward_norm: str
    qk_norm: bool


def read_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise InteropError(f"{directory} is not a directory; pass a Hugging Face checkpoint directory "
                           "(config.json + *.safetensors).")
    if not path.is_file():
        raise InteropError(f"{path} is missing; a Hugging Face checkpoint directory needs config.json "
                           "next to its safetensors files.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{path} is not valid JSON (line {err.lineno}): fix or re-export it.") from None


def rope_theta(hf: dict) -> float:
    """rope_theta from transformers 4.x (top level) or 5.x (`rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    if kind not in ("default", None):
        raise InteropError(f"config.json uses rope_type={kind!r}; emo_jax implements only the default RoPE.")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise InteropError("config.json has no rope_theta (nor rope_parameters.rope_theta); add it.")
    return float(theta)


def require(hf: dict, key: str):
    if key not in hf:
        raise InteropError(f"config.json lacks '{key}'; it is required to build the model.")
    return hf[key]


def check_supported(hf: dict) -> None:
    """Features of Llama-family configs that emo_jax's decoder does not implement."""
    heads = require(hf, "num_attention_heads")
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise InteropError(f"num_key_value_heads={kv_heads} != num_attention_heads={heads}: emo_jax implements "
                           "multi-head attention only (no grouped-query attention).")
    if hf.get("attention_bias"):
        raise InteropError("attention_bias=true is not supported (emo_jax projections have no bias).")
    if hf.get("clip_qkv") is not None:
        raise InteropError(f"clip_qkv={hf['clip_qkv']} is not supported; emo_jax never clips q/k/v.")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"hidden_act={hf['hidden_act']!r} is not supported; emo_jax experts are SwiGLU (silu).")
    if hf.get("norm_topk_prob"):
        raise InteropError("norm_topk_prob=true (top-k gates renormalised to sum 1) is not supported; emo_jax "
                           "gates are the un-renormalised softmax probabilities, as in EMO and OLMoE-1B-7B.")


def common_model_fields(hf: dict) -> dict:
    """ModelConfig fields every Llama-family config.json carries."""
    check_supported(hf)
    heads, d_model = require(hf, "num_attention_heads"), require(hf, "hidden_size")
    return dict(
        vocab_size=require(hf, "vocab_size"), d_model=d_model, n_layers=require(hf, "num_hidden_layers"),
        n_heads=heads, head_dim=hf.get("head_dim") or d_model // heads,
        max_seq_len=require(hf, "max_position_embeddings"), rope_theta=rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), expert_hidden=require(hf, "intermediate_size"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_placement="pre",
    )


def common_hf_fields(m: ModelConfig, dtype: str) -> dict:
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.expert_hidden,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads,
        "head_dim": m.head_dim, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "norm_topk_prob": False, "num_experts_per_tok": m.top_k,
        "initializer_range": m.init_std, "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
    }


def decoder_sources(m: ModelConfig, expert_counts: tuple[int, ...], names: LayerNames,
                    router_rows: tuple[int, ...]) -> dict[tuple[str, ...], Source]:
    """{emo param path: source} for the whole decoder.

    expert_counts[l]: experts E_l in layer l (shared last); router_rows[l]: rows of the
    stored `mlp.gate.weight` (E_l for EMO; E_l for OLMoE). EMO's shared rows are unused
    for one shared expert (weight 1) and are the `shared_router` for two or more.
    """
    d, h, dh, hm = m.d_model, m.n_heads, m.head_dim, m.expert_hidden
    out: dict[tuple[str, ...], Source] = {("embedding",): identity("model.embed_tokens.weight", (m.vocab_size, d))}
    for layer in range(m.n_layers):
        p = f"model.layers.{layer}."
        e = expert_counts[layer]
        n_routed = e - m.n_shared_experts
        base = (f"layer_{layer}",)
        out[base + ("attention_norm", "scale")] = identity(p + names.attention_norm + ".weight", (d,))
        out[base + ("feedforward_norm", "scale")] = identity(p + names.feedforward_norm + ".weight", (d,))
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[base + ("attention", proj)] = FromHF(p + f"self_attn.{proj}.weight", (h * dh, d), (h, dh, d),
                                                     (2, 1), (2, 0, 1))
        out[base + ("attention", "o_proj")] = FromHF(p + "self_attn.o_proj.weight", (d, h * dh), (d, h, dh),
                                                     (1, 2), (1, 2, 0))
        if names.qk_norm:
            for norm in ("q_norm", "k_norm"):
                out[base + ("attention", norm, "scale")] = FromHF(p + f"self_attn.{norm}.weight", (h * dh,),
                                                                  (h, dh), (2,), (0, 1))
        out[base + ("moe", "router")] = FromHF(p + "mlp.gate.weight", (router_rows[layer], d), (n_routed, d),
                                               (1, 1), (1, 0), rows=n_routed)
        if m.n_shared_experts >= 2:  # the shared experts' own router: the last n_s rows
            n_s = m.n_shared_experts
            out[base + ("moe", "shared_router")] = FromHF(p + "mlp.gate.weight", (router_rows[layer], d), (n_s, d),
                                                          (1, 1), (1, 0), rows=n_s, row_offset=n_routed)
        for emo_name, hf_name, hf_shape in (("w_gate", "gate_proj", (hm, d)), ("w_up", "up_proj", (hm, d)),
                                            ("w_down", "down_proj", (d, hm))):
            out[base + ("moe", emo_name)] = Stacked(tuple(
                transposed(p + f"mlp.experts.{i}.{hf_name}.weight", hf_shape) for i in range(e)))
    out[("final_norm", "scale")] = identity("model.norm.weight", (d,))
    if not m.tie_embeddings:
        out[("lm_head",)] = transposed("lm_head.weight", (m.vocab_size, d))
    return out
