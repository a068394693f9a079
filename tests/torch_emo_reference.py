"""An independent PyTorch reference of the EMO decoder, for tests
(docs/algorithm.md#one-moe-layer, #architecture-of-the-released-models).

Written from that description, not from emo_jax: it reads a state dict with the EMO Hugging
Face names and runs HF-style inference (no document pool: top-k_r over the routed
experts, gates not renormalised; the shared experts, the last n_s, weighted by a softmax over
their own router rows' logits: weight 1 for one, nothing for none). Experts are computed
densely (every expert on every token, weighted by a mostly-zero gate matrix), the
simplest correct form. Supports pruned models via `num_experts_per_layer`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def emo_hf_config(vocab=96, hidden=32, layers=2, heads=2, head_dim=16, inter=16, experts=8, shared=1,
                  top_k=4, max_pos=64, theta=10_000.0, eps=1e-6, per_layer=None) -> dict:
    config = {
        "architectures": ["EmoForCausalLM"], "model_type": "emo", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "head_dim": head_dim, "max_position_embeddings": max_pos,
        "rms_norm_eps": eps, "rope_theta": theta, "num_experts": experts, "num_shared_experts": shared,
        "num_experts_per_tok": top_k, "norm_topk_prob": False, "tie_word_embeddings": False,
        "hidden_act": "silu", "eos_token_id": 0,
    }
    if per_layer is not None:
        config["num_experts_per_layer"] = list(per_layer)
    return config


def experts_in_layer(config: dict, layer: int) -> int:
    per_layer = config.get("num_experts_per_layer")
    return per_layer[layer] if per_layer else config["num_experts"]


def random_state_dict(config: dict, seed: int = 0, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Random weights under the EMO names (shared router rows random too: they must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    d, v, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    width = config["num_attention_heads"] * config["head_dim"]

    def rand(*shape, scale=std):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": rand(v, d, scale=1.0), "model.norm.weight": 1 + rand(d, scale=0.1),
          "lm_head.weight": rand(v, d)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd[p + "pre_attention_layernorm.weight"] = 1 + rand(d, scale=0.1)
        sd[p + "pre_feedforward_layernorm.weight"] = 1 + rand(d, scale=0.1)
        for name in ("q_proj", "k_proj", "v_proj"):
            sd[p + f"self_attn.{name}.weight"] = rand(width, d)
        sd[p + "self_attn.o_proj.weight"] = rand(d, width)
        experts = experts_in_layer(config, layer)
        sd[p + "mlp.gate.weight"] = rand(experts, d, scale=1.0)
        for e in range(experts):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = rand(inter, d)
            sd[p + f"mlp.experts.{e}.up_proj.weight"] = rand(inter, d)
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = rand(d, inter)
    return sd


def save_checkpoint(directory: Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in state_dict.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [B, H, S, Dh], positions 0..S-1, rotate-half convention."""
    dh, seq = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = dh // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(h: torch.Tensor, sd: dict, p: str, config: dict) -> torch.Tensor:
    b, s, _ = h.shape
    heads, dh = config["num_attention_heads"], config["head_dim"]

    def project(name):
        return (h @ sd[p + f"self_attn.{name}.weight"].T).view(b, s, heads, dh).transpose(1, 2)

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    q, k = _rope(q, config["rope_theta"]), _rope(k, config["rope_theta"])
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, s, heads * dh) @ sd[p + "self_attn.o_proj.weight"].T


def _expert(x: torch.Tensor, sd: dict, p: str, e: int) -> torch.Tensor:
    w1, w3 = sd[p + f"mlp.experts.{e}.gate_proj.weight"], sd[p + f"mlp.experts.{e}.up_proj.weight"]
    w2 = sd[p + f"mlp.experts.{e}.down_proj.weight"]
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _moe(h: torch.Tensor, sd: dict, p: str, config: dict, layer: int) -> torch.Tensor:
    experts, shared = experts_in_layer(config, layer), config["num_shared_experts"]
    routed, k_r = experts - shared, config["num_experts_per_tok"] - shared
    all_logits = h.float() @ sd[p + "mlp.gate.weight"].T
    logits = all_logits[..., :routed]  # the routed experts' softmax excludes the shared rows
    probs = torch.softmax(logits, dim=-1)
    top_vals, top_ids = torch.topk(probs, k_r, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, top_ids, top_vals)  # not renormalised
    out = torch.zeros_like(h)
    for e in range(routed):
        out = out + gates[..., e:e + 1] * _expert(h, sd, p, e)
    if shared:
        shared_weights = torch.softmax(all_logits[..., routed:], dim=-1)  # exactly 1.0 when n_s = 1
        for j, e in enumerate(range(routed, experts)):
            out = out + shared_weights[..., j:j + 1] * _expert(h, sd, p, e)
    return out


@torch.no_grad()
def forward(tokens: torch.Tensor, sd: dict, config: dict) -> torch.Tensor:
    """tokens: int64[B, S] (one document per row) -> float32 logits [B, S, V]."""
    eps = config["rms_norm_eps"]
    x = sd["model.embed_tokens.weight"][tokens]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = x + _attention(_rms_norm(x, sd[p + "pre_attention_layernorm.weight"], eps), sd, p, config)
        x = x + _moe(_rms_norm(x, sd[p + "pre_feedforward_layernorm.weight"], eps), sd, p, config, layer)
    return _rms_norm(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T
