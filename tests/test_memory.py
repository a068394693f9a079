"""`emo_jax.memory`: the activation estimate, by hand for the released model and
against what XLA allocates for a small one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from emo_jax import memory
from emo_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_activation_bytes_of_the_released_model_by_hand():
    """EMO-1B14B prefill of 1 x 4096 tokens in bf16, term by term from the module doc."""
    m = load_config(ROOT / "configs" / "emo_1b14b.yaml").model
    t, heads, hd, d, k, he, v = 4096, 16, 128, 2048, 8, 1024, 100352
    qkv_out = 3 * t * heads * hd * 2 + t * heads * hd * 2
    attention = qkv_out + 2 * heads * t * t * 4  # reference kernel: f32 S x S scores and probabilities
    fused = qkv_out + t * heads * hd * 4 + 2 * heads * t * 4  # f32 accumulator and row statistics
    moe = 2 * t * k * d * 2 + 3 * t * k * he * 2 + 2 * t * 127 * 4
    logits = t * v * (2 + 4)
    residual = 2 * t * d * 4
    assert logits > attention > moe > fused  # the LM head's logits dominate at this vocabulary
    assert memory.activation_bytes(m, 1, t, 2, 128, "reference") == logits + residual
    assert memory.activation_bytes(m, 1, t, 2, 128) == logits + residual
    # Long rows: with the reference kernel the S x S scores take over (quadratic in S);
    # a fused kernel stays linear, and the logits stay the largest term.
    t2 = 4 * t
    attention2 = 3 * t2 * heads * hd * 2 + 2 * heads * t2 * t2 * 4 + t2 * heads * hd * 2
    assert memory.activation_bytes(m, 1, t2, 2, 128, "reference") == attention2 + 2 * t2 * d * 4
    assert memory.activation_bytes(m, 1, t2, 2, 128, "blocked") == 4 * (logits + residual)


def test_activation_bytes_scaling():
    m = load_config(ROOT / "configs" / "tiny.yaml").model
    base = memory.activation_bytes(m, 2, 64, 4, m.n_experts)
    assert memory.activation_bytes(m, 4, 64, 4, m.n_experts) == 2 * base  # linear in the batch
    assert memory.activation_bytes(m, 2, 64, 2, m.n_experts) < base  # smaller compute dtype
    # Pruning shrinks only the router's probabilities; at a tiny vocabulary the MoE term
    # is the largest, so fewer experts per layer is a smaller estimate.
    small_vocab = dataclasses.replace(m, vocab_size=16)
    assert memory.activation_bytes(small_vocab, 2, 64, 4, 4) < memory.activation_bytes(small_vocab, 2, 64, 4, 8)


def test_activation_bytes_is_a_lower_bound_of_what_xla_allocates():
    """The estimate leaves out XLA temporaries: what the compiled forward allocates
    (temporaries + output) must be at least the estimate, and not wildly more."""
    config = load_config(ROOT / "configs" / "tiny.yaml", ["kernels.moe_backend=reference"])
    from emo_jax.model import build_model
    model = build_model(config)
    tokens = jnp.zeros((4, 128), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, jnp.ones_like(tokens)))
    compiled = jax.jit(lambda p, t: model.apply(p, t, jnp.ones_like(t), train=False)[0]).lower(params, tokens).compile()
    analysis = compiled.memory_analysis()
    allocated = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    estimate = memory.activation_bytes(config.model, 4, 128, 4, config.model.n_experts)
    assert estimate <= allocated <= 8 * estimate, (estimate, allocated)
