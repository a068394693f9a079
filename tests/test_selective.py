"""Selective expert use (docs/algorithm.md#selective-expert-use-and-pruning): pruning is exact, selection is greedy and
deterministic, bad K is refused, pruned checkpoints load / evaluate / fine-tune, the
CLI commands run on a small built dataset and fail with one-line errors.

Tiny models (d_model 32, 2 layers, 8 experts = 7 routed + 1 shared, top-4) with
random parameters; the CLI tests use a 3-domain text_files dataset.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import progression_batch, tiny_config  # noqa: E402

from emo_jax import moe, routing  # noqa: E402
from emo_jax.config import ConfigError, replace  # noqa: E402
from emo_jax.kernels import reference  # noqa: E402
from emo_jax.model import build_model  # noqa: E402
from emo_jax.model.layers import RMSNorm, segment_positions  # noqa: E402
from emo_jax.model.transformer import Block  # noqa: E402
from emo_jax.modular import ModularError, analyze, probe  # noqa: E402
from emo_jax import artifact  # noqa: E402
from emo_jax.modular.prune import check_counts, param_bytes, parse_counts, prune, prune_params  # noqa: E402
from emo_jax.modular.select import (Selection, greedy_selection, random_selection, score_sums,  # noqa: E402
                                    top_experts)
from emo_jax.train.step import init_params  # noqa: E402
from param_helpers import save_run_checkpoint  # noqa: E402

B, S = 4, 32
SMALL = ("model.d_model=32", "model.head_dim=8", "model.expert_hidden=32", "model.max_seq_len=32",
         "data.seq_len=32", "data.global_batch_size=8")


@functools.lru_cache(maxsize=None)
def setup(*overrides: str):
    """Config and random params (init std raised so the router is far from uniform)."""
    cfg = tiny_config(*SMALL, "model.init_std=0.3", *overrides)
    params = init_params(build_model(cfg), cfg, jax.random.PRNGKey(0))
    return cfg, params


def batch(seed: int = 0) -> dict:
    return progression_batch(np.random.default_rng(seed), B, S, 512)


def logits_of(cfg, params, b) -> np.ndarray:
    logits, _ = build_model(cfg).apply({"params": params}, b["inputs"], b["segment_ids"], b["positions"],
                                       train=False)
    return np.asarray(logits)


# ------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("pool", ["routing.eval_pool=none", "routing.eval_pool=fixed"])
def test_pruned_model_keeping_all_experts_equals_full_model_exactly(pool):
    cfg, params = setup(pool)
    n_r = cfg.model.n_routed_experts
    keep = [tuple(range(n_r))] * cfg.model.n_layers
    pruned_cfg, pruned_params = prune(cfg, params, keep)
    assert pruned_cfg.model.layer_experts == (8, 8)
    b = batch()
    np.testing.assert_array_equal(logits_of(pruned_cfg, pruned_params, b), logits_of(cfg, params, b))


def restricted_moe(keep_routed: np.ndarray):
    """Reference MoE layer over the FULL expert stack whose router may only pick the
    routed experts in `keep_routed`: logits outside are -inf, so the softmax is
    renormalised over the subset and top-k_r is taken inside it."""
    def fn(x, segment_ids, pool_sizes, w_router, w_gate, w_up, w_down, *, routed_top_k, n_shared):
        n_r = w_router.shape[-1]
        mask = jnp.zeros((n_r,), bool).at[jnp.asarray(keep_routed)].set(True)
        logits = jnp.where(mask, moe.router_logits(x, w_router), -jnp.inf)
        r = routing.route(logits, segment_ids, routed_top_k, pool_sizes, num_segments=segment_ids.shape[1] + 1)
        ids, gates = routing.add_shared_experts(r.expert_ids, r.gates, n_r, n_shared)
        b, s, d = x.shape
        y = reference.moe_ffn(x.reshape(-1, d), ids.reshape(b * s, -1), gates.reshape(b * s, -1),
                              (segment_ids > 0).reshape(-1), w_gate, w_up, w_down)
        return y.reshape(b, s, d), r.stats
    return fn


def restricted_full_model_logits(cfg, params, keep, b) -> np.ndarray:
    """The full model's forward, layer by layer, each router restricted to its subset."""
    m = cfg.model
    x = jnp.take(params["embedding"], b["inputs"], axis=0)
    seg = jnp.asarray(b["segment_ids"])
    positions = segment_positions(seg)
    for layer in range(m.n_layers):
        block = Block(m, cfg.routing, restricted_moe(np.asarray(keep[layer])))
        x, _ = block.apply({"params": params[f"layer_{layer}"]}, x, seg, seg, positions, False)
    x = RMSNorm(m.norm_eps).apply({"params": params["final_norm"]}, x)
    return np.asarray(jnp.einsum("bsd,dv->bsv", x, params["lm_head"]))


@pytest.mark.parametrize("pool", ["routing.eval_pool=none", "routing.eval_pool=fixed"])
def test_pruned_model_equals_full_model_with_router_restricted_to_subset(pool):
    cfg, params = setup(pool, "routing.eval_pool_size=4")
    keep = [(0, 2, 5, 6), (1, 3, 4)]  # K = 5 and K = 4 (uneven layers)
    pruned_cfg, pruned_params = prune(cfg, params, keep)
    assert pruned_cfg.model.layer_experts == (5, 4)
    assert pruned_params["layer_1"]["moe"]["router"].shape == (32, 3)
    assert pruned_params["layer_0"]["moe"]["w_gate"].shape == (5, 32, 32)
    b = batch(1)
    pruned = logits_of(pruned_cfg, pruned_params, b)
    restricted = restricted_full_model_logits(cfg, params, keep, b)
    # Same math; the softmax reduces over 4 vs 7 (+ exact zeros) logits and the grouped
    # matmul groups rows differently, so the last float bits may differ.
    np.testing.assert_allclose(pruned, restricted, rtol=0, atol=2e-5)
    # And the restriction matters: the unrestricted full model is different.
    assert np.abs(logits_of(cfg, params, b) - restricted).max() > 1e-3


def test_pruned_params_are_the_kept_slices_with_shared_last():
    cfg, params = setup()
    pruned = prune_params(params, cfg.model, [(6, 1), None])  # slicing alone; K checks live elsewhere
    moe0, full0 = pruned["layer_0"]["moe"], params["layer_0"]["moe"]
    np.testing.assert_array_equal(moe0["w_up"], full0["w_up"][np.array([1, 6, 7])])  # ascending + shared (7)
    np.testing.assert_array_equal(moe0["router"], full0["router"][:, [1, 6]])
    assert pruned["layer_1"] is params["layer_1"]


# ------------------------------------------------------------------------- selection

def test_score_is_the_mean_router_probability_over_real_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(score_sums(jnp.asarray(logits), jnp.asarray(valid), 2, "probability"),
                               p[valid].sum(0), rtol=1e-5)
    top2 = np.argsort(-p, axis=-1)[..., :2]
    freq = np.stack([(top2[valid] == i).sum() for i in range(6)]).astype(np.float32)
    np.testing.assert_array_equal(score_sums(jnp.asarray(logits), jnp.asarray(valid), 2, "frequency"), freq)
    assert top_experts(np.array([0.1, 0.5, 0.5, 0.2]), 2) == (1, 2)  # tie -> lower index, ascending
    assert top_experts(np.array([0.3, 0.1, 0.3, 0.9]), 2) == (0, 3)


def test_greedy_selection_is_deterministic_and_uses_pruned_earlier_layers():
    cfg, params = setup()
    calib = [batch(2)]
    first = greedy_selection(cfg, params, calib, (5, 4))
    second = greedy_selection(cfg, params, calib, (5, 4))
    assert first == second
    assert [len(k) for k in first.keep] == [4, 3]
    assert Selection.from_json(first.to_json()) == first
    # Layer 0: the top-4 mean probabilities of the full model.
    _, router = probe.router_logits(cfg, params, calib[0])
    valid = jnp.asarray(calib[0]["segment_ids"]) > 0
    full0 = np.asarray(score_sums(router[0], valid, 3, "probability")) / float(valid.sum())
    np.testing.assert_allclose(first.scores[0], full0, rtol=1e-6)
    assert first.keep[0] == top_experts(full0, 4)
    # Layer 1 is scored on the model whose layer 0 is already pruned.
    pruned_cfg, pruned_params = prune(cfg, params, [first.keep[0], None])
    _, router = probe.router_logits(pruned_cfg, pruned_params, calib[0])
    pruned1 = np.asarray(score_sums(router[1], valid, 3, "probability")) / float(valid.sum())
    np.testing.assert_allclose(first.scores[1], pruned1, rtol=1e-6)
    _, router_full = probe.router_logits(cfg, params, calib[0])
    full1 = np.asarray(score_sums(router_full[1], valid, 3, "probability")) / float(valid.sum())
    assert np.abs(full1 - pruned1).max() > 1e-4
    assert first.keep[1] == top_experts(pruned1, 3)


def test_random_selection_is_seeded():
    cfg, _ = setup()
    a, b, c = (random_selection(cfg, (4, 6), s) for s in (0, 0, 1))
    assert a == b and a != c
    assert [len(k) for k in a.keep] == [3, 5]
    assert all(list(k) == sorted(set(k)) and max(k) < 7 for k in a.keep)


# ------------------------------------------------------------------------- bad K, config

@pytest.mark.parametrize("keep, words", [
    ("9", "K=9 for layer 0 is larger than the 8 experts it holds"),
    ("3", "K=3 for layer 0 is below model.top_k=4"),
    ("8,8,8", "gives 3 counts but the model has 2 layers"),
    ("eight", "must be an integer"),
])
def test_impossible_k_is_refused_with_a_clear_error(keep, words):
    cfg, params = setup()
    with pytest.raises(ModularError, match=words):
        check_counts(cfg.model, parse_counts(keep, cfg.model.n_layers))
    if keep in ("9", "3"):
        with pytest.raises(ModularError, match=words):
            greedy_selection(cfg, params, [batch()], parse_counts(keep, 2))
        with pytest.raises(ModularError, match=words):
            random_selection(cfg, parse_counts(keep, 2), 0)


def test_pruning_a_pruned_layer_further_checks_its_own_count():
    cfg, params = setup()
    pruned_cfg, _ = prune(cfg, params, [(0, 1, 2, 3), None])
    with pytest.raises(ModularError, match="K=6 for layer 0 is larger than the 5 experts"):
        check_counts(pruned_cfg.model, (6, 6))


@pytest.mark.parametrize("overrides, words", [
    (("model.layer_experts=[8]",), "has 1 entries but model.n_layers=2"),
    (("model.layer_experts=[8,3]",), r"layer_experts\[1\]=3 must be in \[top_k=4, n_experts=8\]"),
    (("model.layer_experts=[9,8]",), r"layer_experts\[0\]=9 must be in"),
    (("model.layer_experts=8",), "must be a list"),
    (("model.layer_experts=[8,5]", "mesh.expert=2", "mesh.data=4"), r"run this pruned model with mesh.expert=1"),
])
def test_layer_experts_validation(overrides, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(*overrides)


def test_layer_experts_round_trips_through_yaml_and_json(tmp_path):
    from emo_jax.config import load_config, to_dict
    import yaml
    cfg = tiny_config("model.layer_experts=[6,4]")
    assert cfg.model.expert_counts == (6, 4) and cfg.model.routed_counts == (5, 3) and cfg.model.is_pruned
    assert to_dict(cfg)["model"]["layer_experts"] == [6, 4]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(tmp_path / "c.yaml") == cfg
    assert tiny_config().model.expert_counts == (8, 8) and not tiny_config().model.is_pruned


def test_expert_axis_must_divide_every_pruned_layer():
    from emo_jax.parallel.mesh import build_mesh
    from emo_jax.train.sharded import build_sharded_model
    cfg = tiny_config("model.layer_experts=[8,6]", "mesh.expert=2", "mesh.data=4")
    build_sharded_model(cfg, build_mesh(cfg.mesh))  # 8 and 6 both divide by 2
    cfg = tiny_config("model.layer_experts=[8,6]", "mesh.expert=-1", "mesh.data=1")  # expert axis = 8
    with pytest.raises(ConfigError, match=r"model.layer_experts\[1\]=6 is not divisible .* mesh.expert=1"):
        build_sharded_model(cfg, build_mesh(cfg.mesh))


def test_param_count_and_bytes_follow_per_layer_counts():
    from emo_jax.param_count import count_params
    cfg, params = setup()
    pruned_cfg, pruned_params = prune(cfg, params, [(0, 1, 2, 3), (4, 5, 6)])
    full, small = count_params(cfg), count_params(pruned_cfg)
    d, h = 32, 32
    assert full.experts - small.experts == (3 + 4) * 3 * d * h
    assert full.total - small.total == (3 + 4) * (3 * d * h + d)  # experts + router columns
    assert full.active - small.active == (3 + 4) * d  # same top-k compute, fewer router columns
    before, after = param_bytes(params), param_bytes(pruned_params)
    assert before["total"] - after["total"] == 4 * (full.total - small.total)
    assert before["experts"] - after["experts"] == 4 * (full.experts - small.experts)


def test_load_balance_of_uneven_pruned_model_uses_each_layers_expert_count():
    from emo_jax import losses
    from emo_jax.train.objective import objective
    cfg, params = setup("routing.pool=none")
    pruned_cfg, pruned_params = prune(cfg, params, [(0, 1, 2, 3, 4), (4, 5, 6)])  # 5 and 3 routed
    b = batch(3)
    logits, stats = build_model(pruned_cfg).apply({"params": pruned_params}, b["inputs"], b["segment_ids"],
                                                  b["positions"], train=True)
    assert stats.expert_counts.shape == (2, 5)
    assert float(stats.expert_counts[1, 3:].sum()) == 0.0  # padding columns
    parts = objective(logits, stats, b, pruned_cfg, step_tokens=jnp.asarray(b["loss_mask"].sum()))
    per_layer = [losses.load_balance_loss(jax.tree.map(lambda s: s[l], stats), n, 3) for l, n in enumerate((5, 3))]
    np.testing.assert_allclose(parts.load_balance, np.mean(per_layer), rtol=1e-6)
    # Layer 1 keeps exactly k_r = 3 routed experts: each token uses all of them, perfect balance.
    np.testing.assert_allclose(per_layer[1], 1.0, rtol=1e-5)


# ------------------------------------------------------------------------- analysis

def test_document_routing_and_cosine():
    logits = jnp.asarray([[[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 0]]])  # 1 doc, 2 real tokens
    seg = jnp.asarray([[1, 1, 0]])
    mean, used, counts = analyze.document_routing(logits, seg, 1, None)
    p = np.exp([5.0, 0, 0, 0]) / np.exp([5.0, 0, 0, 0]).sum()
    np.testing.assert_allclose(mean[0], (p + p[[1, 0, 2, 3]]) / 2, rtol=1e-6)
    assert used[0].tolist() == [True, True, False, False]
    assert counts[0].tolist() == [1, 1, 0, 0]
    cos = analyze.cosine_matrix(np.array([[1.0, 0], [1, 1], [0, 2]]))
    np.testing.assert_allclose(cos, [[1, 2 ** -0.5, 0], [2 ** -0.5, 1, 2 ** -0.5], [0, 2 ** -0.5, 1]], atol=1e-12)
    assert analyze.mean_off_diagonal(cos) == pytest.approx(2 * 2 ** -0.5 / 3)


# ------------------------------------------------------------------------- checkpoints + CLI

WORDS = {"red": "apple cherry rose ruby blood fire brick tomato".split(),
         "green": "leaf grass frog lime moss fern olive pine".split(),
         "blue": "sky sea ocean navy azure cobalt lake river".split()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-domain text_files dataset and a random-init checkpoint trained on nothing."""
    from emo_jax.data import corpus_builder
    from emo_jax.data.tokenizer import save_tokenizer, train_bpe
    tmp = tmp_path_factory.mktemp("selective")
    rng = np.random.default_rng(0)
    docs = [{"text": " ".join(rng.choice(WORDS[d], size=40)), "domain": d} for i in range(60) for d in WORDS]
    (tmp / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    builder = corpus_builder.text_files_builder(
        tmp / "dd", corpus_builder.TextFilesConfig(name="colors", paths=(str(tmp / "docs.jsonl"),),
                                                    validation_fraction=0.2))
    directory = corpus_builder.build(builder)
    save_tokenizer(train_bpe([d["text"] for d in docs], vocab_size=300), directory)
    cfg = tiny_config(*SMALL, "model.init_std=0.3", "model.vocab_size=320", "data.dataset=text_files/colors",
                      f"data.data_dir={tmp / 'dd'}", "train.steps=2", "train.log_every=1",
                      "train.progress_bar=false", f"train.run_dir={tmp / 'full'}")
    params = init_params(build_model(cfg), cfg, jax.random.PRNGKey(0))
    save_run_checkpoint(tmp / "full", cfg, params, step=3)  # a training run directory
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "calib.jsonl").write_text(json.dumps({"text": " ".join(WORDS["blue"] * 5)}) + "\n")
    return tmp, cfg, params


def cli(*args: str) -> int:
    from emo_jax.cli import main
    return main(list(args))


def test_checkpoint_round_trip(world):
    tmp, cfg, params = world
    loaded = artifact.load(tmp / "full")
    loaded_cfg, loaded, step = loaded.config, loaded.params, loaded.source.step
    assert step == 3 and loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_cli_select_prune_eval_analyze_and_finetune(world, capsys):
    tmp, cfg, params = world
    sel = tmp / "sel.json"
    assert cli("select", "--checkpoint", str(tmp / "full"), "--keep", "5", "--domain", "blue", "--out", str(sel)) == 0
    selection = Selection.from_json(sel.read_text())
    assert selection.counts == (5, 5) and selection.source == "4 training documents of blue"
    assert cli("select", "--checkpoint", str(tmp / "full"), "--keep", "5", "--calibration",
               str(tmp / "calib.jsonl")) == 0
    out = tmp / "pruned"
    assert cli("prune", "--checkpoint", str(tmp / "full"), "--selection", str(sel), "--out", str(out),
               "train.steps=2") == 0
    text = capsys.readouterr().out
    assert "parameter bytes:" in text and "model.layer_experts=[5, 5]" in text
    assert (out / "config.yaml").is_file() and (out / "selection.json").is_file()
    pruned = artifact.load(out)
    pruned_cfg, pruned_params = pruned.config, pruned.params
    assert pruned.source.kind == "model" and pruned_cfg.model.layer_experts == (5, 5)
    assert pruned_cfg.train.run_dir == str(out / "finetune") and pruned_cfg.train.init_from == str(out)
    expected_cfg, expected = prune(cfg, params, selection.keep)
    jax.tree.map(np.testing.assert_array_equal, pruned_params, expected)

    assert cli("eval", "--checkpoint", str(out), "--json", str(tmp / "eval.json")) == 0
    result = json.loads((tmp / "eval.json").read_text())
    assert set(result["domains"]) == {"red", "green", "blue"} and result["layer_experts"] == [5, 5]
    assert all(np.isfinite(r["loss"]) and r["perplexity"] > 1 for r in result["domains"].values())
    assert cli("eval", "--checkpoint", str(tmp / "full"), "--pool", "4", "--domains", "red") == 0
    assert "pool fixed 4" in capsys.readouterr().out

    assert cli("analyze", "--checkpoint", str(tmp / "full"), "--docs-per-domain", "3", "--out",
               str(tmp / "an")) == 0
    summary = json.loads((tmp / "an" / "analysis.json").read_text())
    assert len(summary["layers"]) == 2 and np.asarray(summary["layers"][0]["domain_cosine"]).shape == (3, 3)
    for name in ("domain_cosine.png", "expert_usage.png", "experts_for_90pct_mass.png", "domain_cosine.csv",
                 "expert_usage.csv", "experts_for_90pct_mass.csv"):
        assert (tmp / "an" / name).stat().st_size > 0
    layer = summary["layers"][0]
    for key in ("mean_domain_cosine", "mean_centered_cosine", "mean_usage_cosine", "mean_experts_for_90pct_mass"):
        assert np.isfinite(layer[key]), key
    assert "centred cosine" in capsys.readouterr().out

    # Fine-tune the pruned model with the ordinary training command (train.init_from=OUT).
    assert cli("train", "--config", str(out / "config.yaml")) == 0
    assert "initialised from" in capsys.readouterr().out
    assert artifact.resolve(out / "finetune").step == 2


@pytest.mark.parametrize("kind", ["model", "hf"])
def test_select_prune_eval_on_a_model_folder_and_a_hugging_face_folder(world, capsys, kind):
    """The same parameters as the run directory `full`, saved as another kind of source:
    the same selection, the same pruned parameters, finite held-out losses."""
    from emo_jax.interop import export_hf
    tmp, cfg, params = world
    source = tmp / f"full_{kind}"
    data = []
    if kind == "model":
        if not source.exists():
            artifact.save(source, cfg, params)
    else:
        if not source.exists():
            export_hf(params, cfg, source, layout="emo")
        # an HF folder carries only the model: the data (and routing) sections are given
        data = [f"data.dataset={cfg.data.dataset}", f"data.data_dir={cfg.data.data_dir}",
                f"data.seq_len={cfg.data.seq_len}", f"data.global_batch_size={cfg.data.global_batch_size}",
                "routing.segments=explicit", f"routing.pool={cfg.routing.pool}"]
    run_sel, kind_sel = tmp / f"sel_run_{kind}.json", tmp / f"sel_{kind}.json"
    assert cli("select", "--model", str(tmp / "full"), "--keep", "5", "--domain", "red", "--out", str(run_sel)) == 0
    assert cli("select", "--model", str(source), "--keep", "5", "--domain", "red", "--out", str(kind_sel),
               *data) == 0
    assert Selection.from_json(kind_sel.read_text()).keep == Selection.from_json(run_sel.read_text()).keep
    out = tmp / f"pruned_from_{kind}"
    assert cli("prune", "--model", str(source), "--selection", str(kind_sel), "--out", str(out), *data) == 0
    expected_cfg, expected = prune(cfg, params, Selection.from_json(kind_sel.read_text()).keep)
    jax.tree.map(np.testing.assert_array_equal, artifact.load(out).params, expected)
    assert json.loads((out / "prune.json").read_text())["source_kind"] == kind
    capsys.readouterr()
    assert cli("eval", "--model", str(source), "--domains", "red", "--max-batches", "1", "--json",
               str(tmp / f"eval_{kind}.json"), *data) == 0
    assert f"({source} ({kind})" in capsys.readouterr().out
    assert np.isfinite(json.loads((tmp / f"eval_{kind}.json").read_text())["loss"])
    assert cli("analyze", "--model", str(source), "--docs-per-domain", "2", "--out", str(tmp / f"an_{kind}"),
               *data) == 0


def test_pruned_checkpoint_loads_with_the_generic_model_loader(world):
    tmp, cfg, params = world
    out = tmp / "pruned_random"
    assert cli("prune", "--checkpoint", str(tmp / "full"), "--keep", "4", "--method", "random",
               "--out", str(out)) == 0
    config, loaded = artifact.load(out).config, artifact.load(out).params
    assert config.model.layer_experts == (4, 4)
    assert loaded["layer_0"]["moe"]["w_gate"].shape[0] == 4


@pytest.mark.parametrize("args, words", [
    (("select", "--checkpoint", "{tmp}/nowhere", "--keep", "4", "--domain", "red"), "nowhere: no such directory"),
    (("select", "--checkpoint", "{tmp}/full", "--keep", "4", "--domain", "purple"), "unknown domain 'purple'"),
    (("select", "--checkpoint", "{tmp}/full", "--keep", "4", "--calibration", "{tmp}/empty.txt"), "holds no text"),
    (("select", "--checkpoint", "{tmp}/full", "--keep", "4", "--calibration", "{tmp}/none.txt"), "does not exist"),
    (("select", "--checkpoint", "{tmp}/full", "--keep", "12", "--domain", "red"), "larger than the 8 experts"),
    (("select", "--checkpoint", "{tmp}/full", "--keep", "2", "--domain", "red"), "below model.top_k=4"),
    (("select", "--checkpoint", "{tmp}/full", "--keep", "4"), "give calibration text"),
    (("prune", "--checkpoint", "{tmp}/full", "--out", "{tmp}/x"), "give --selection FILE"),
    (("prune", "--checkpoint", "{tmp}/full", "--keep", "4", "--method", "random", "--out", "{tmp}/full"),
     "already exists and is not an empty folder"),
    (("eval", "--checkpoint", "{tmp}/full", "--pool", "many"), "must be 'none' or a number"),
])
def test_cli_errors_are_one_line(world, capsys, args, words):
    tmp = world[0]
    assert cli(*(a.format(tmp=tmp) for a in args)) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
