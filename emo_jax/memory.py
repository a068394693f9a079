"""Parameter bytes and peak inference memory of full and pruned models, from shapes alone.

The estimate for one forward pass over `batch` x `seq_len` tokens (a prefill; decoding
one token needs far less activation memory) is

  peak = weights + KV cache + max(largest per-layer transient, LM-head logits)
         + the residual stream,

with the transients of the code as written: attention with a fused kernel (config
`kernels.attention` auto, blocked, splash or flash_gpu; `generate` runs the prompt
through it too) keeps q, k, v, its output and a float32 accumulator [B, S, H, Dh] with
two float32 row statistics [B, H, S], and its tiles, which are not counted; the
`reference` kernel (`jax.nn.dot_product_attention` with its XLA lowering) materialises
the float32 scores and probabilities [B, H, S, S] instead; the dropless MoE's sorted
token copies [B*S*k, D] and expert hiddens [B*S*k, H_e] (gate, up, their product);
logits [B, S, V] in float32. Allocator slack, XLA temporaries and the compiled program
are not counted, so a measured peak is higher by a few percent.
"""

from __future__ import annotations

import dataclasses

from emo_jax.config import ModelConfig

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def layer_param_count(m: ModelConfig, n_experts: int) -> int:
    """Parameters of one decoder layer holding `n_experts` experts (shared included)."""
    attention = 4 * m.d_model * m.n_heads * m.head_dim + (2 * m.n_heads * m.head_dim if m.qk_norm else 0)
    router = m.d_model * (n_experts - m.n_shared_experts)
    if m.n_shared_experts >= 2:  # the shared experts' own router
        router += m.d_model * m.n_shared_experts
    experts = 3 * n_experts * m.d_model * m.expert_hidden
    return attention + router + experts + 2 * m.d_model


def param_count(m: ModelConfig, expert_counts: tuple[int, ...]) -> int:
    """All parameters, with expert_counts[l] experts in layer l."""
    embedding = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return embedding + m.d_model + sum(layer_param_count(m, e) for e in expert_counts)


def kv_cache_bytes(m: ModelConfig, batch: int, seq_len: int, dtype_bytes: int) -> int:
    return 2 * m.n_layers * batch * seq_len * m.n_heads * m.head_dim * dtype_bytes


def activation_bytes(m: ModelConfig, batch: int, seq_len: int, dtype_bytes: int, max_experts: int,
                     attention_kernel: str = "auto") -> int:
    """Largest transient of one forward pass plus the residual stream (see module doc);
    `attention_kernel` as config `kernels.attention` (only "reference" is quadratic)."""
    tokens = batch * seq_len
    copies = tokens * m.top_k
    if attention_kernel == "reference":
        scores = 2 * batch * m.n_heads * seq_len * seq_len * 4  # f32 scores and probabilities
    else:
        scores = tokens * m.n_heads * m.head_dim * 4 + 2 * batch * m.n_heads * seq_len * 4  # f32 accumulator, stats
    attention = (3 * tokens * m.n_heads * m.head_dim * dtype_bytes  # q, k, v
                 + scores
                 + tokens * m.n_heads * m.head_dim * dtype_bytes)  # output
    moe = (2 * copies * m.d_model * dtype_bytes  # sorted copies in and out
           + 3 * copies * m.expert_hidden * dtype_bytes  # gate, up, silu(gate) * up
           + 2 * tokens * (max_experts - m.n_shared_experts) * 4)  # router logits and probabilities (f32)
    logits = tokens * m.vocab_size * (4 + dtype_bytes)  # compute dtype, then float32
    residual = 2 * tokens * m.d_model * 4
    return max(attention, moe, logits) + residual


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    experts_per_layer: int
    params: int
    param_bytes: int  # weights in the weight dtype
    kv_cache_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.param_bytes + self.kv_cache_bytes + self.activation_bytes


def memory_rows(m: ModelConfig, expert_options: tuple[int, ...], batch: int, seq_len: int,
                weight_dtype: str = "bfloat16", attention_kernel: str = "auto") -> list[MemoryRow]:
    """One row per uniform expert count (e.g. 128 full, 32 and 16 kept experts per layer)."""
    weight_bytes, act_bytes = DTYPE_BYTES[weight_dtype], DTYPE_BYTES[m.dtype]
    rows = []
    for e in expert_options:
        n = param_count(m, (e,) * m.n_layers)
        rows.append(MemoryRow(e, n, n * weight_bytes, kv_cache_bytes(m, batch, seq_len, act_bytes),
                              activation_bytes(m, batch, seq_len, act_bytes, e, attention_kernel)))
    return rows


def format_table(name: str, rows: list[MemoryRow], batch: int, seq_len: int, weight_dtype: str,
                 measured: dict[int, int] | None = None) -> str:
    """A Markdown table; `measured` maps experts per layer to a measured peak in bytes."""
    lines = [f"{name}: weights in {weight_dtype}, forward over batch {batch} x {seq_len} tokens (GiB)", "",
             "| experts/layer | params | weights | KV cache | activations | peak (estimate) | peak (measured) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        got = (measured or {}).get(r.experts_per_layer)
        got_text = f"{got / GIB:.2f}" if got else "n/a"
        lines.append(f"| {r.experts_per_layer} | {r.params / 1e9:.2f} B | {r.param_bytes / GIB:.2f} | "
                     f"{r.kv_cache_bytes / GIB:.2f} | {r.activation_bytes / GIB:.2f} | {r.peak_bytes / GIB:.2f} | "
                     f"{got_text} |")
    return "\n".join(lines)
