"""OLMoE interop: a tiny random transformers `OlmoeForCausalLM`, built offline, saved,
converted, and matched logit for logit (float32, 1e-4) on unpacked rows and on packed
rows (each document against HF on its own); export round trips bit-exactly and loads
back into transformers. Needs the `interop` extra (torch + transformers)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from emo_jax import artifact  # noqa: E402
from emo_jax.interop import export_hf  # noqa: E402
from emo_jax.interop.safetensors_io import SafetensorsReader  # noqa: E402
from emo_jax.model import build_model  # noqa: E402


def import_hf(source, **kwargs):
    """(config, params) of a Hugging Face folder through the one loader, emo_jax.artifact.load."""
    loaded = artifact.load(source, **kwargs)
    return loaded.config, loaded.params

VOCAB = 96


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    """(HF model, its directory, converted config, converted params)."""
    config = transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10_000.0, initializer_range=0.2, eos_token_id=0, pad_token_id=1,
        tie_word_embeddings=False, norm_topk_prob=False)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    directory = tmp_path_factory.mktemp("olmoe")
    model.save_pretrained(directory)
    converted_config, params = import_hf(directory)
    return model, directory, converted_config, params


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def test_converted_config(olmoe):
    _, _, config, _ = olmoe
    m = config.model
    assert (m.qk_norm, m.n_shared_experts, m.n_experts, m.top_k, m.norm_placement) == (True, 0, 8, 2, "pre")
    assert (m.norm_eps, m.rope_theta, m.head_dim, m.expert_hidden) == (1e-5, 10_000.0, 8, 16)
    assert config.routing.pool == "none" and config.routing.eval_pool == "none"


def test_logits_match_transformers_unpacked_and_packed(olmoe):
    model, _, config, params = olmoe
    rng = np.random.default_rng(0)
    seq, lengths = 24, (10, 11)
    tokens = rng.integers(0, VOCAB, (3, seq))
    segments = np.ones((3, seq), np.int32)
    segments[2] = 0  # row 2: two packed documents, then padding
    start = 0
    for doc, n in enumerate(lengths):
        tokens[2, start:start + n] = tokens[doc, :n]
        segments[2, start:start + n] = doc + 1
        start += n
    forward = jax.jit(lambda p, t, s: build_model(config).apply({"params": p}, t, s)[0])
    logits = np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(segments)))
    np.testing.assert_allclose(logits[:2], _hf_logits(model, tokens[:2]), atol=1e-4, rtol=0)
    start = 0
    for doc, n in enumerate(lengths):
        expected = _hf_logits(model, tokens[doc:doc + 1, :n])[0]
        np.testing.assert_allclose(logits[2, start:start + n], expected, atol=1e-4, rtol=0)
        start += n


def test_export_round_trip_is_bit_exact(olmoe, tmp_path):
    model, directory, config, params = olmoe
    export_hf(params, config, tmp_path / "out", layout="olmoe")
    original, exported = SafetensorsReader(directory), SafetensorsReader(tmp_path / "out")
    assert set(original.keys()) == set(exported.keys())
    for name in original.keys():
        a, b = np.asarray(original.array(name)), np.asarray(exported.array(name))
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == "olmoe" and hf["num_experts"] == 8 and hf["norm_topk_prob"] is False
    # transformers reads the export and computes the same logits as the original model.
    reloaded = transformers.OlmoeForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.arange(12)[None] % VOCAB
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(model, tokens))
