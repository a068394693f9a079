"""Decoding with a KV cache: equal to full recomputation (greedy and top-p sampling, full
and pruned models), EOS handling, clear errors, the `generate`/`convert` CLI, and the
memory estimate against real shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import cli, memory
from emo_jax.compat import make_mesh
from emo_jax.generate import (GenerationError, SamplingConfig, generate, sample_token, top_p_logits)
from emo_jax.interop import export_hf
from emo_jax import artifact
from emo_jax.interop.safetensors_io import SafetensorsReader
from emo_jax import generate as generate_lib
from emo_jax.model import kv_cache
from emo_jax.model.kv_cache import init_cache
from emo_jax.parallel.mesh import MESH_AXES
from emo_jax.param_count import count_params
from helpers import tiny_config
from param_helpers import logits, random_params


def load_model(source, **kwargs):
    """(config, params) of a model source through the one loader, emo_jax.artifact.load."""
    loaded = artifact.load(source, **kwargs)
    return loaded.config, loaded.params

# The model family of the interop tests (tests/torch_emo_reference.py defaults). The
# cache does not depend on the MoE backend: the reference one compiles fastest on CPU.
MODEL = ("model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.expert_hidden=16",
         "model.vocab_size=96", "model.max_seq_len=64", "model.rope_theta=10000.0", "data.seq_len=64",
         "kernels.moe_backend=reference")
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 4, 77]]
NEW = 6


def _config(pruned: bool):
    return tiny_config(*MODEL, *(("model.layer_experts=[8, 5]",) if pruned else ()))


@pytest.fixture(scope="module", params=[False, True], ids=["full", "pruned"])
def model(request):
    config = _config(request.param)
    return config, random_params(config, seed=3, std=0.3)


def _recompute(config, params, prompts, new_tokens) -> list[np.ndarray]:
    """Logits of every generated position by a full forward pass without cache."""
    rows = [list(p) + [int(t) for t in new] for p, new in zip(prompts, new_tokens)]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], segments[i, :len(row)] = row, 1
    full = logits(config, params, tokens, segments)
    return [full[i, len(p) - 1:len(p) - 1 + len(new)] for i, (p, new) in enumerate(zip(prompts, new_tokens))]


def test_cached_decoding_equals_full_recomputation(model):
    config, params = model
    greedy = generate(config, params, PROMPTS, SamplingConfig(max_new_tokens=NEW), return_logits=True)
    assert greedy.tokens.shape == (2, NEW) and list(greedy.lengths) == [NEW, NEW]
    for row, expected in enumerate(_recompute(config, params, PROMPTS, greedy.tokens)):
        np.testing.assert_allclose(greedy.logits[row], expected, atol=1e-4, rtol=1e-5)
        np.testing.assert_array_equal(greedy.tokens[row], expected.argmax(-1))

    sampling = SamplingConfig(max_new_tokens=NEW, temperature=1.5, top_p=0.9, seed=7)
    sampled = generate(config, params, PROMPTS, sampling, return_logits=True)
    for row, expected in enumerate(_recompute(config, params, PROMPTS, sampled.tokens)):
        np.testing.assert_allclose(sampled.logits[row], expected, atol=1e-4, rtol=1e-5)
    again = generate(config, params, PROMPTS, sampling, return_logits=True)
    np.testing.assert_array_equal(sampled.tokens, again.tokens)  # reproducible from the seed
    assert not np.array_equal(sampled.tokens, greedy.tokens)


def test_cached_decoding_with_two_shared_experts():
    """n_s = 2 (shared experts weighted by their own router's softmax) through the KV-cache path."""
    config = tiny_config(*MODEL, "model.n_shared_experts=2")
    params = random_params(config, seed=3, std=0.3)
    assert params["layer_0"]["moe"]["shared_router"].shape == (32, 2)
    greedy = generate(config, params, PROMPTS, SamplingConfig(max_new_tokens=NEW), return_logits=True)
    for row, expected in enumerate(_recompute(config, params, PROMPTS, greedy.tokens)):
        np.testing.assert_allclose(greedy.logits[row], expected, atol=1e-4, rtol=1e-5)
        np.testing.assert_array_equal(greedy.tokens[row], expected.argmax(-1))


def _prefill(config, params, tokens, lengths, cache):
    """The prompt pass of `generate`: through the cached path when given a cache
    (init_cache), else the prefill path (the attention kernel, a cache of the prompt)."""
    from emo_jax.model import build_model
    model = build_model(generate_lib.inference_config(config))
    index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    segments = (index < lengths[:, None]).astype(jnp.int32)
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    (out, _), state = model.apply(variables, tokens, segments, jnp.broadcast_to(index, tokens.shape),
                                  train=False, mutable=["cache"])
    return out, state["cache"]


def test_prefill_through_the_attention_kernel_equals_the_cached_path(model):
    """Prefill without a cache (the kernel, then `extend`) gives the logits and the cache
    of a prompt pass through the cached path on an empty cache: the same valid slots and
    the same keys and values in them (a padding slot's entries are never read)."""
    config, params = model
    tokens, lengths = generate_lib.pad_prompts(PROMPTS)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    want_logits, want_cache = _prefill(config, params, tokens, lengths,
                                       init_cache(config.model, len(PROMPTS), tokens.shape[1] + NEW))
    got_logits, got_cache = _prefill(config, params, tokens, lengths, None)
    got_cache = kv_cache.extend(got_cache, NEW)
    valid = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(got_logits)[valid], np.asarray(want_logits)[valid], atol=1e-5, rtol=1e-5)
    assert jax.tree.structure(got_cache) == jax.tree.structure(want_cache)
    for layer in want_cache:
        got, want = got_cache[layer]["attention"], want_cache[layer]["attention"]
        np.testing.assert_array_equal(np.asarray(got["valid"]), np.asarray(want["valid"]))
        slots = np.asarray(want["valid"])
        assert slots.sum() == sum(map(len, PROMPTS))
        for name in ("key", "value"):
            assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
            np.testing.assert_allclose(np.asarray(got[name])[slots], np.asarray(want[name])[slots], atol=1e-5)


def test_prefill_memory_grows_linearly_in_the_prompt():
    """No [B, 1, S, T] mask or [B, H, S, T] scores in the prompt pass: its compiled
    temporary memory grows ~4x from a 1024- to a 4096-token prompt (16x if quadratic)."""
    config = tiny_config(*MODEL, "model.max_seq_len=4200", "kernels.attention=blocked")
    params = random_params(config, seed=3, std=0.3)

    def temp_bytes(prompt_len: int) -> int:
        tokens = jnp.ones((1, prompt_len), jnp.int32)
        lengths = jnp.asarray([prompt_len], jnp.int32)
        run = jax.jit(lambda p, t, n: _prefill(config, p, t, n, None))
        return run.lower(params, tokens, lengths).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large < 6 * small, (small, large)


def test_eos_stops_a_row(model):
    config, params = model
    first = generate(config, params, PROMPTS, SamplingConfig(max_new_tokens=NEW), return_logits=True)
    eos = int(first.tokens[0, 0])
    stopped = generate(config, params, PROMPTS, SamplingConfig(max_new_tokens=NEW, eos_id=eos, pad_id=95),
                       return_logits=True)
    assert stopped.lengths[0] == 1 and stopped.tokens[0, 0] == eos
    assert list(stopped.tokens[0, 1:]) == [95] * (NEW - 1)


def test_top_p_one_keeps_every_token_of_a_large_vocabulary():
    """At V = 100352 the float32 mass of all but the last tokens can round to >= 1;
    top_p = 1 must still keep every finite logit."""
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 100352)), jnp.float32)
    assert bool(jnp.all(jnp.isfinite(top_p_logits(logits, 1.0))))
    assert bool(jnp.all(jnp.isfinite(top_p_logits(logits, jnp.float32(1.0)))))


def test_top_p_and_temperature():
    logits_ = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.isfinite(np.asarray(top_p_logits(logits_, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(top_p_logits(logits_, 1e-3))).sum() == 1  # always the best one
    key = jax.random.PRNGKey(0)
    sample = jax.jit(sample_token)  # one compile for the 41 calls (each would trace both conds)
    assert int(sample(logits_, key, 0.0, 1.0)[0]) == 0  # temperature 0: greedy
    draws = [int(sample(logits_, jax.random.fold_in(key, i), 1.0, 0.7)[0]) for i in range(40)]
    assert set(draws) == {0, 1}


def _nucleus_by_sorting(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus by its definition, in float64: sort, and keep the tokens whose
    strictly more likely tokens hold less than top_p (ties kept together)."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kept = np.zeros(probs.shape, bool)
    for row, p in enumerate(probs):
        for i, value in enumerate(p):
            kept[row, i] = p[p > value].sum() < top_p
    return kept


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.9, 0.99, 1.0])
def test_top_p_bisection_equals_the_sorted_nucleus(top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype(np.float32) * 2
    logits[1] = np.round(logits[1])  # many ties
    logits[2, :] = 0.0  # all tied: everything or (top_p < 1) still everything
    logits[3, 5:] = -np.inf  # masked tokens stay out
    kept = np.isfinite(np.asarray(top_p_logits(jnp.asarray(logits), top_p)))
    expected = _nucleus_by_sorting(logits.astype(np.float64), top_p)
    np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_logits(jnp.asarray(logits[4]), top_p))), kept[4])
    if top_p < 1.0:  # float32 vs float64 sums: a token whose strictly-above mass is within rounding of top_p
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        above = np.array([[p[p > v].sum() for v in p] for p in probs])
        borderline = np.abs(above - top_p) < 1e-5
        kept, expected = kept[~borderline], expected[~borderline]
    np.testing.assert_array_equal(kept, expected)


def test_clear_errors():
    config = _config(False)
    params = None  # never reached: inputs are checked first
    context = config.model.max_seq_len
    with pytest.raises(GenerationError, match=f"has {context + 1} tokens but the model's context is max_seq_len"):
        generate(config, params, [[1] * (context + 1)])
    with pytest.raises(GenerationError, match="lower max_new_tokens to at most 4"):
        generate(config, params, [[1] * (context - 4)], SamplingConfig(max_new_tokens=5))
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(config, params, [[1], []])
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(config, params, [[1, 96]])
    with pytest.raises(GenerationError, match="top_p"):
        generate(config, params, [[1]], SamplingConfig(top_p=0.0))


def _word_tokenizer(path):
    """A word-level tokenizer.json over a few words (ids 0..), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<|endoftext|>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return tokenizer


def test_cli_convert_generate_export(tmp_path, capsys):
    config, params = _config(False), random_params(_config(False), seed=3, std=0.3)
    export_hf(params, config, tmp_path / "hf", layout="emo")
    tokenizer = _word_tokenizer(tmp_path / "hf" / "tokenizer.json")  # travels with the model
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "converted"),
                     "kernels.moe_backend=reference"]) == 0
    converted_config, converted = load_model(tmp_path / "converted")
    assert converted_config.model == config.model
    np.testing.assert_array_equal(np.asarray(converted["lm_head"]), np.asarray(params["lm_head"]))
    _, on_mesh = load_model(tmp_path / "converted", mesh=make_mesh((2, 2, 2, 1), MESH_AXES),
                            overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"])
    w_up = on_mesh["layer_1"]["moe"]["w_up"]
    assert w_up.addressable_shards[0].data.shape == (4, 16, 16)  # [E/expert, D/fsdp, H]
    np.testing.assert_array_equal(np.asarray(w_up), np.asarray(params["layer_1"]["moe"]["w_up"]))

    prompts = ["the cat sat on the mat a", "dog ran far"]
    ids = [tokenizer.encode(p).ids for p in prompts]
    assert list(map(len, ids)) == [7, 3]
    expected = generate(config, params, ids, SamplingConfig(max_new_tokens=NEW, eos_id=0), return_logits=True)
    capsys.readouterr()
    args = ["generate", str(tmp_path / "converted"), "--max-new-tokens", str(NEW)]
    assert cli.main(args + sum((["--prompt", p] for p in prompts), [])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for line, prompt_ids, new, n in zip(lines, ids, expected.tokens, expected.lengths):
        assert line == tokenizer.decode(prompt_ids, skip_special_tokens=False) + tokenizer.decode(
            [int(t) for t in new[:n]], skip_special_tokens=False)

    too_long = " ".join(["1"] * 70)
    assert cli.main(["generate", str(tmp_path / "converted"), "--prompt-ids", too_long]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_seq_len=64" in err and "shorten the prompt" in err
    assert cli.main(["generate", str(tmp_path / "converted"), "--prompt", "the cat", "--tokenizer", "nope.json"]) == 1
    assert "tokenizer file nope.json does not exist" in capsys.readouterr().err

    # emo_jax -> EMO layout again: the same bytes as the first export.
    assert cli.main(["convert", str(tmp_path / "converted"), str(tmp_path / "back"), "--to", "emo"]) == 0
    first, back = SafetensorsReader(tmp_path / "hf"), SafetensorsReader(tmp_path / "back")
    for name in first.keys():
        assert np.asarray(first.array(name)).tobytes() == np.asarray(back.array(name)).tobytes(), name
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert cli.main(["convert", str(tmp_path / "converted"), str(tmp_path / "x"), "--to", "olmoe"]) == 1
    assert "OLMoE layout" in capsys.readouterr().err


def test_load_model_from_a_training_run(tmp_path):
    from emo_jax.train.checkpoint import Checkpointer
    from emo_jax.train.step import TrainState
    config = _config(True)
    params = random_params(config, seed=1)
    state = TrainState(step=np.int32(3), params=params, opt_state={"mu": params})
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", every=1, keep=1)
    checkpointer.save(3, state, {}, config, seed=0, force=True)
    checkpointer.close()
    (tmp_path / "run" / "config.yaml").write_text("{}")  # as `emo-jax prune` writes next to checkpoints/
    loaded_config, loaded = load_model(tmp_path / "run")
    assert loaded_config.model.layer_experts == (8, 5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("pruned", [False, True])
def test_memory_estimate_matches_shapes(pruned):
    config = _config(pruned)
    m = config.model
    assert memory.param_count(m, m.expert_counts) == count_params(config).total
    cache = init_cache(m, batch=3, length=20)
    kv = sum(x.nbytes for layer in cache.values() for name, x in layer["attention"].items() if name != "valid")
    assert memory.kv_cache_bytes(m, 3, 20, 4) == kv
    rows = memory.memory_rows(dataclasses.replace(m, layer_experts=None), (8, 5), batch=1, seq_len=64)
    assert rows[0].param_bytes > rows[1].param_bytes and rows[0].kv_cache_bytes == rows[1].kv_cache_bytes


def test_memory_estimate_counts_the_shared_router():
    config = tiny_config(*MODEL, "model.n_shared_experts=2")
    m = config.model
    assert memory.param_count(m, m.expert_counts) == count_params(config).total
