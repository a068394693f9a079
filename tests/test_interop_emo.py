"""EMO-layout interop: export/import round trips (full and pruned), sharded import on the
8-device mesh, clear errors, and logit parity with an independent PyTorch reference of
the EMO decoder (that part needs torch + safetensors: the `interop` extra)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import traverse_util

from emo_jax.compat import make_mesh
from emo_jax.config import replace
from emo_jax import artifact
from emo_jax.interop import InteropError, export_hf
from emo_jax.interop.safetensors_io import SafetensorsReader, write_checkpoint
from emo_jax.model import build_model
from emo_jax.artifact import boxed_abstract_params as abstract_boxed_params
from emo_jax.parallel.mesh import MESH_AXES
from emo_jax.parallel.rules import param_shardings
from helpers import tiny_config


def import_hf(source, **kwargs):
    """(config, params) of a Hugging Face folder through the one loader, emo_jax.artifact.load."""
    loaded = artifact.load(source, **kwargs)
    return loaded.config, loaded.params


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def _flat_shardings(tree):
    return traverse_util.flatten_dict(tree)


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=str(key))


def _prune(params, config, keep_per_layer):
    """Physically keep routed experts `keep_per_layer[l]` (sorted ids) plus the shared ones."""
    params = jax.tree.map(np.asarray, jax.device_get(params))
    n_r = config.model.n_routed_experts
    shared = list(range(n_r, config.model.n_experts))
    for layer, keep in enumerate(keep_per_layer):
        moe = params[f"layer_{layer}"]["moe"]
        rows = list(keep) + shared
        for name in ("w_gate", "w_up", "w_down"):
            moe[name] = moe[name][rows]
        moe["router"] = moe["router"][:, list(keep)]
    counts = tuple(len(k) + len(shared) for k in keep_per_layer)
    return params, replace(config, model={"layer_experts": list(counts)})


def _logits(config, params, tokens, segment_ids):
    """Jitted forward (eager op-by-op dispatch is slow on CPU). tokens, segment_ids: [B, S]."""
    model = build_model(config)
    fn = jax.jit(lambda p, t, s: model.apply({"params": p}, t, s)[0])
    return np.asarray(fn(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(segment_ids, jnp.int32)))


def random_params(config, seed=0):
    """Random values in the model's parameter shapes, without compiling the model."""
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(abstract_boxed_params(config))
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape).astype(a.dtype)), abstract)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config("model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.expert_hidden=16",
                         "model.vocab_size=96", "model.max_seq_len=64", "data.seq_len=64")
    return config, random_params(config)


def test_export_import_round_trip_is_bit_exact(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, tmp_path / "a", layout="emo")
    hf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert hf["model_type"] == "emo" and hf["num_experts"] == 8 and hf["num_shared_experts"] == 1
    assert "num_experts_per_layer" not in hf
    imported_config, imported = import_hf(tmp_path / "a")
    assert imported_config.model.n_experts == 8 and imported_config.model.top_k == config.model.top_k
    _assert_same_params(params, imported)
    export_hf(imported, imported_config, tmp_path / "b", layout="emo")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # The shared expert's router row exists in the EMO layout and is unused (zero).
    gate = SafetensorsReader(tmp_path / "a").array("model.layers.0.mlp.gate.weight")
    assert gate.shape == (8, 32) and not np.any(gate[7])


def test_sharded_export_splits_files_and_reads_back(tiny, tmp_path):
    config, params = tiny
    files = export_hf(params, config, tmp_path / "split", layout="emo", max_shard_bytes=64_000)
    assert len(files) > 1 and (tmp_path / "split" / "model.safetensors.index.json").is_file()
    _, imported = import_hf(tmp_path / "split")
    _assert_same_params(params, imported)


def test_bfloat16_export(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, tmp_path / "bf16", layout="emo", dtype="bfloat16")
    reader = SafetensorsReader(tmp_path / "bf16")
    assert reader.dtype("lm_head.weight") == jnp.bfloat16
    _, imported = import_hf(tmp_path / "bf16")  # bf16 on disk -> float32 parameters, exactly
    expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
    _assert_same_params(expected, imported)


def test_pruned_export_import(tiny, tmp_path):
    config, params = tiny
    pruned, pruned_config = _prune(params, config, [[0, 1, 2, 3, 4, 5, 6], [1, 3, 6, 2]])
    export_hf(pruned, pruned_config, tmp_path / "pruned", layout="emo")
    hf = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert hf["num_experts_per_layer"] == [8, 5] and hf["num_experts"] == 8
    assert SafetensorsReader(tmp_path / "pruned").shape("model.layers.1.mlp.gate.weight") == (5, 32)
    imported_config, imported = import_hf(tmp_path / "pruned")
    assert imported_config.model.layer_experts == (8, 5)
    _assert_same_params(pruned, imported)
    with pytest.raises(InteropError, match="per-layer expert counts"):
        export_hf(pruned, pruned_config, tmp_path / "olmoe", layout="olmoe")


def test_import_onto_mesh_equals_unsharded(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, tmp_path / "hf", layout="emo")
    mesh = make_mesh((2, 2, 2, 1), MESH_AXES)
    config_sharded, sharded = import_hf(tmp_path / "hf", mesh=mesh,
                                        overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"])
    _assert_same_params(params, sharded)
    w_gate = sharded["layer_0"]["moe"]["w_gate"]
    assert w_gate.sharding.spec[:2] == ("expert", "fsdp")
    assert w_gate.addressable_shards[0].data.shape == (4, 16, 16)  # [E/2, D/2, H]
    expected = _flat_shardings(param_shardings(abstract_boxed_params(config_sharded), mesh))
    for path, leaf in traverse_util.flatten_dict(sharded).items():
        assert leaf.sharding.is_equivalent_to(expected[path], leaf.ndim), path


def test_clear_errors(tiny, tmp_path):
    config, params = tiny
    good = tmp_path / "good"
    export_hf(params, config, good, layout="emo")
    hf = json.loads((good / "config.json").read_text())

    def variant(name, **changes):
        path = tmp_path / name
        path.mkdir()
        shutil.copy(good / "model.safetensors", path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({**hf, **changes}))
        return path

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InteropError, match="empty holds no config.json"):
        import_hf(empty)
    with pytest.raises(InteropError, match="unknown checkpoint layout"):
        import_hf(variant("llama", model_type="llama", architectures=["LlamaForCausalLM"]))
    with pytest.raises(InteropError, match=r"tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has shape"):
        import_hf(variant("shape", intermediate_size=24))
    with pytest.raises(InteropError, match="num_key_value_heads"):
        import_hf(variant("gqa", num_key_value_heads=1))
    with pytest.raises(InteropError, match="norm_topk_prob"):
        import_hf(variant("renorm", norm_topk_prob=True))
    with pytest.raises(InteropError, match="input_layernorm.weight' of the olmoe layout is missing"):
        import_hf(variant("olmoe_names", model_type="olmoe", architectures=["OlmoeForCausalLM"]))
    extra = variant("extra")
    reader = SafetensorsReader(good)
    tensors = [(name, np.asarray(reader.array(name))) for name in reader.keys()]
    write_checkpoint(extra, iter(tensors + [("model.layers.0.self_attn.q_norm.weight", np.ones(32, np.float32))]))
    with pytest.raises(InteropError, match="q_norm.weight' is not part of this layout"):
        import_hf(extra)
    with pytest.raises(InteropError, match="unknown layout"):
        import_hf(good, layout="gpt2")
    with pytest.raises(InteropError, match="OLMoE layout"):
        export_hf(params, config, tmp_path / "no_olmoe", layout="olmoe")  # shared expert, no QK-norm


# ------------------------------------------------------------------ PyTorch reference


@pytest.fixture(scope="module")
def torch_reference():
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import torch_emo_reference as ref
    return torch, ref


@pytest.mark.parametrize("shared", [0, 1, 2], ids=["shared0", "shared1", "shared2"])
@pytest.mark.parametrize("per_layer", [None, (8, 5)], ids=["full", "pruned"])
def test_logits_match_torch_reference(torch_reference, tmp_path, per_layer, shared):
    """0, 1 and 2 shared experts (2: weighted by the softmax of their own router rows)."""
    torch, ref = torch_reference
    hf = ref.emo_hf_config(per_layer=per_layer, shared=shared)
    state = ref.random_state_dict(hf, seed=1)
    ref.save_checkpoint(tmp_path / "emo", hf, state)
    config, params = import_hf(tmp_path / "emo")
    assert config.model.expert_counts == (per_layer or (8, 8)) and config.model.n_shared_experts == shared
    assert ("shared_router" in params["layer_0"]["moe"]) == (shared >= 2)
    rng = np.random.default_rng(0)

    # Rows 0-1 unpacked (one document each), row 2 packed: two documents and padding,
    # each document compared with the reference run on it alone.
    seq, lengths = 26, (9, 13)
    tokens = rng.integers(0, hf["vocab_size"], (3, seq))
    segments = np.ones((3, seq), np.int32)
    segments[2] = 0
    start = 0
    for doc, n in enumerate(lengths):
        tokens[2, start:start + n] = tokens[doc, :n]
        segments[2, start:start + n] = doc + 1
        start += n
    logits = _logits(config, params, tokens, segments)
    expected = ref.forward(torch.tensor(tokens[:2]), state, hf).numpy()
    np.testing.assert_allclose(logits[:2], expected, atol=1e-4, rtol=0)
    start = 0
    for doc, n in enumerate(lengths):
        expected = ref.forward(torch.tensor(tokens[doc:doc + 1, :n]), state, hf).numpy()[0]
        np.testing.assert_allclose(logits[2, start:start + n], expected, atol=1e-4, rtol=0)
        start += n

    # Export gives back the reference's tensors (one shared expert's router row is unused: zero).
    export_hf(params, config, tmp_path / "back", layout="emo")
    back = SafetensorsReader(tmp_path / "back")
    assert set(back.keys()) == set(state)
    for name, tensor in state.items():
        expected = tensor.numpy().copy()
        if name.endswith("mlp.gate.weight") and shared == 1:
            expected[-1] = 0.0
        np.testing.assert_array_equal(np.asarray(back.array(name)), expected, err_msg=name)


# ------------------------------------------------------------------ issue 14 bugs


def test_export_writes_a_pad_token_id_inside_the_vocabulary(tiny, tmp_path):
    """The official EmoConfig defaults pad_token_id to 100277 and EmoModel builds
    nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id): export must name a valid id."""
    config, params = tiny
    export_hf(params, config, tmp_path / "a", layout="emo")
    hf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "pad_token_id" in hf and hf["pad_token_id"] is not None
    assert 0 <= hf["pad_token_id"] < hf["vocab_size"]
    torch = pytest.importorskip("torch")
    torch.nn.Embedding(hf["vocab_size"], hf["hidden_size"], padding_idx=hf["pad_token_id"])  # what EmoModel does
    export_hf(params, config, tmp_path / "b", layout="emo", pad_id=5)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["pad_token_id"] == 5
    with pytest.raises(InteropError, match="pad_id=96"):
        export_hf(params, config, tmp_path / "c", layout="emo", pad_id=96)


def test_missing_num_shared_experts_means_zero(tiny, tmp_path):
    """The official EmoConfig default is num_shared_experts=0."""
    from emo_jax.interop import hf_emo
    config, _ = tiny
    exported = hf_emo.hf_config(config.model, config.model.expert_counts, "float32", 0)
    del exported["num_shared_experts"]
    assert hf_emo.model_fields(exported)["n_shared_experts"] == 0


def test_export_to_emo_refuses_qk_norm(tmp_path):
    """The official EMO class has no QK-norm: it would ignore q_norm/k_norm and compute other logits."""
    config = tiny_config("model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.expert_hidden=16",
                         "model.vocab_size=96", "model.max_seq_len=64", "data.seq_len=64", "model.qk_norm=true")
    with pytest.raises(InteropError, match="cannot export to the EMO layout: qk_norm=true") as err:
        export_hf(random_params(config), config, tmp_path / "qk", layout="emo")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "qk").exists()


def test_truncated_safetensors_is_a_one_line_error(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, tmp_path / "cut", layout="emo")
    path = tmp_path / "cut" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated") as err:
        import_hf(tmp_path / "cut")
    assert "\n" not in str(err.value)


def test_null_eos_token_id_round_trips_as_null(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, tmp_path / "a", layout="emo")
    path = tmp_path / "a" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": None}))
    imported_config, imported = import_hf(tmp_path / "a")
    assert imported_config.routing.eos_id is None
    export_hf(imported, imported_config, tmp_path / "b", layout="emo")
    back = json.loads((tmp_path / "b" / "config.json").read_text())
    assert "eos_token_id" in back and back["eos_token_id"] is None
    assert 0 <= back["pad_token_id"] < back["vocab_size"]


def test_cli_export_names_the_model_it_refuses_and_takes_a_pad_id(tmp_path, capsys):
    from emo_jax import cli
    base = ("model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.expert_hidden=16",
            "model.vocab_size=96", "model.max_seq_len=64", "data.seq_len=64")
    config = tiny_config(*base)
    artifact.save(tmp_path / "plain", config, random_params(config))
    assert cli.main(["convert", str(tmp_path / "plain"), str(tmp_path / "out"), "--to", "emo", "--pad-id", "3"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == 3
    qk = tiny_config(*base, "model.qk_norm=true")
    artifact.save(tmp_path / "qk", qk, random_params(qk))
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "qk"), str(tmp_path / "qk_out"), "--to", "emo"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "qk") in err and "qk_norm=true" in err
    assert not (tmp_path / "qk_out").exists()


def test_missing_eos_token_id_takes_the_official_default(tiny, tmp_path):
    """EmoConfig defaults eos_token_id to 100257; outside a smaller vocabulary that id does not exist."""
    from emo_jax.interop.convert import config_from_hf
    from emo_jax.interop import hf_emo
    config, _ = tiny
    hf = hf_emo.hf_config(config.model, config.model.expert_counts, "float32", 0)
    del hf["eos_token_id"]
    assert config_from_hf(dict(hf, vocab_size=100352), hf_emo,
                          overrides=["routing.pool=none"]).routing.eos_id == 100257
    assert config_from_hf(hf, hf_emo).routing.eos_id == 0  # out of range: as before, 0


def test_official_options_emo_jax_lacks_are_refused(tiny, tmp_path):
    from emo_jax.interop import hf_emo
    config, _ = tiny
    hf = hf_emo.hf_config(config.model, config.model.expert_counts, "float32", 0)
    for key, value, match in (("always_active_experts", [0], "always_active_experts"),
                              ("num_shared_experts_per_layer", [1, 2], "num_shared_experts_per_layer"),
                              ("num_experts_per_layer", [0, 8], "dense layers"),
                              ("ghost_extend_eval", "true", "ghost_extend_eval")):
        with pytest.raises(InteropError, match=match):
            hf_emo.model_fields(dict(hf, **{key: value}))
    hf_emo.model_fields(dict(hf, always_active_experts=None, ghost_extend_eval=False))


def test_broken_index_and_missing_shard_name_the_file(tiny, tmp_path):
    config, params = tiny
    export_hf(params, config, tmp_path / "split", layout="emo", max_shard_bytes=64_000)
    index = tmp_path / "split" / "model.safetensors.index.json"
    shard = sorted((tmp_path / "split").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} is missing") as err:
        import_hf(tmp_path / "split")
    assert "\n" not in str(err.value)
    index.write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not a valid index"):
        import_hf(tmp_path / "split")
