"""Specialisation measures, the balanced validation sample, log-window means and the
reproduction's aggregation (emo_jax/specialisation.py, train/eval_sample.py,
train/metrics.py, modular/reproduce.py)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import specialisation as spec
from emo_jax.data import corpus_builder
from emo_jax.data.tokenizer import save_tokenizer, train_bpe
from emo_jax.modular import reproduce
from emo_jax.train.eval_sample import build_eval_sample, host_rows
from emo_jax.train.metrics import WindowMean

from helpers import tiny_config


# ------------------------------------------------------------------ the measures

def test_experts_for_mass_counts_the_fewest_experts_holding_the_fraction():
    rows = np.array([[0.1] * 10, [1.0] + [0.0] * 9, [0.5, 0.4, 0.1] + [0.0] * 7, [0.05, 0.85, 0.1] + [0.0] * 7])
    assert spec.experts_for_mass(rows, 0.9).tolist() == [9, 1, 2, 2]
    assert spec.experts_for_mass(rows, 0.5).tolist() == [5, 1, 1, 1]


def _docs(domain_vectors, per_domain, noise, rng):
    """Documents whose mean routing is their domain's vector plus noise (rows sum to 1)."""
    probs, domains = [], []
    for d, v in enumerate(domain_vectors):
        x = np.clip(v + noise * rng.standard_normal((per_domain, v.size)), 1e-6, None)
        probs.append(x / x.sum(-1, keepdims=True))
        domains += [d] * per_domain
    probs = np.concatenate(probs)
    return probs, probs * 30, np.asarray(domains)  # counts: 30 assignments spread like the probs


def test_centred_cosine_separates_what_the_raw_cosine_hides():
    """Near-uniform routing with domain-specific deviations: the raw cosine is close to
    1 for every pair, the centred cosine is not; identical domains give 1 for both."""
    rng = np.random.default_rng(0)
    n = 16
    specific = [np.full(n, 1 / n) + 0.02 * np.eye(n)[d] - 0.02 / n for d in range(4)]
    probs, counts, domains = _docs(specific, 20, 1e-4, rng)
    layer = spec.layer_summary(probs, counts, domains, ["a", "b", "c", "d"])
    assert layer["mean_domain_cosine"] > 0.95
    assert layer["mean_centered_cosine"] < 0.0  # orthogonal deviations (minus their shared mean)
    same = [np.full(n, 1 / n) + 0.02 * np.eye(n)[0]] * 4
    probs, counts, domains = _docs(same, 20, 1e-4, rng)
    layer = spec.layer_summary(probs, counts, domains, ["a", "b", "c", "d"])
    assert layer["mean_centered_cosine"] > 0.99 and layer["mean_usage_cosine"] > 0.99


def test_layer_summary_leaves_out_domains_without_documents():
    rng = np.random.default_rng(1)
    probs, counts, domains = _docs([np.eye(4)[0] + 0.1, np.eye(4)[1] + 0.1], 3, 0.01, rng)
    layer = spec.layer_summary(probs, counts, domains, ["a", "b", "empty"])
    assert set(layer["experts_for_90pct_mass"]) == {"a", "b"}
    assert np.isfinite(layer["mean_centered_cosine"]) and np.isfinite(layer["mean_domain_cosine"])
    summary = spec.summarise([{"mean_probs": probs, "counts": counts}] * 2, domains, ["a", "b", "empty"])
    scalars = spec.scalar_metrics(summary)
    assert set(scalars) == set(spec.SCALAR_METRICS) and all(len(v) == 2 for v in scalars.values())


# ------------------------------------------------------------------ log windows

def test_window_mean_averages_every_step_and_resets():
    window = WindowMean()
    for step in range(4):
        window.add({"loss": jnp.float32(step), "per_layer": jnp.asarray([step, 2.0 * step]),
                    "learning_rate": jnp.float32(10 + step)})
    m = window.result()
    assert m["loss"] == pytest.approx(1.5) and m["per_layer"] == pytest.approx([1.5, 3.0])
    assert m["learning_rate"] == pytest.approx(13.0) and m["window_steps"] == 4
    window.add({"loss": jnp.float32(7.0), "learning_rate": jnp.float32(1.0)})
    assert window.result()["loss"] == pytest.approx(7.0)
    with pytest.raises(ValueError):
        window.result()


def test_logged_training_loss_is_the_mean_over_the_log_window(tmp_path):
    from emo_jax.train.loop import train
    cfg = tiny_config("model.d_model=32", "model.head_dim=8", "data.seq_len=32", "train.steps=6",
                      "train.log_every=3", "train.progress_bar=false", f"train.run_dir={tmp_path}")
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if r["split"] == "train"}
    assert sorted(logged) == [3, 6]
    for step in (3, 6):
        assert logged[step]["window_steps"] == 3
        assert logged[step]["loss"] == pytest.approx(np.mean(result.losses[step - 3:step]), rel=1e-6)
    assert logged[3]["loss"] != pytest.approx(result.losses[2], rel=1e-6), "not the last step's value"


# ------------------------------------------------------------------ the validation sample

COLOURS = {"red": "apple cherry rose ruby blood fire brick tomato".split(),
           "green": "leaf grass frog lime moss fern olive pine".split(),
           "blue": "sky sea ocean navy azure cobalt lake river".split(),
           "rare": "zinc".split()}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """4 domains; 'rare' has few, short documents and comes last in record order."""
    tmp = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    docs = [{"text": " ".join(rng.choice(COLOURS[d], size=60)), "domain": d} for _ in range(40)
            for d in ("red", "green", "blue")]
    docs += [{"text": "zinc " * 5, "domain": "rare"} for _ in range(30)]
    (tmp / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    builder = corpus_builder.text_files_builder(
        tmp / "dd", corpus_builder.TextFilesConfig(name="colours", paths=(str(tmp / "docs.jsonl"),),
                                                    validation_fraction=0.3))
    directory = corpus_builder.build(builder)
    save_tokenizer(train_bpe([d["text"] for d in docs], vocab_size=300), directory)
    return tmp / "dd"


def test_eval_sample_is_balanced_over_domains_and_fixed(colour_data):
    cfg = tiny_config("model.vocab_size=320", "data.dataset=text_files/colours", f"data.data_dir={colour_data}",
                      "data.seq_len=32", "data.global_batch_size=8", "train.eval_batches=3",
                      "train.eval_routing_docs=2")
    sample = build_eval_sample(cfg)
    assert set(sample.domains) == set(COLOURS)
    rows = sample.rows_per_domain
    assert all(rows[d] == 3 * 8 // 4 for d in ("red", "green", "blue")), rows  # 6 rows each
    assert 1 <= rows["rare"] <= 6, rows  # every domain is there, even a small one
    for batch in sample.loss_batches + sample.routing_batches:
        assert batch["inputs"].shape == (8, 32)
    # Routing rows: one document per row (a single segment), eval_routing_docs per domain.
    assert np.bincount(sample.routing_domains).tolist() == [2, 2, 2, 2]
    seg = np.concatenate([b["segment_ids"] for b in sample.routing_batches])[:len(sample.routing_domains)]
    assert set(np.unique(seg)) <= {0, 1} and (seg[:, 0] == 1).all()
    again = build_eval_sample(cfg)
    for a, b in zip(sample.loss_batches, again.loss_batches):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert host_rows(sample.loss_batches[0])["inputs"].shape == (8, 32)  # one process: every row


def test_training_eval_reports_every_domain_and_specialisation(colour_data, tmp_path):
    from emo_jax.train.loop import train
    cfg = tiny_config("model.vocab_size=320", "model.d_model=32", "model.head_dim=8",
                      "data.dataset=text_files/colours", f"data.data_dir={colour_data}", "data.seq_len=32",
                      "data.shuffle_rows=64", "train.steps=4", "train.log_every=2", "train.eval_every=2",
                      "train.eval_batches=2", "train.eval_routing_docs=3", "train.progress_bar=false",
                      f"train.run_dir={tmp_path}")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {f"loss/{d}" for d in COLOURS} <= set(r)
        for name in spec.SCALAR_METRICS:
            assert len(r[f"specialisation/{name}"]) == cfg.model.n_layers
        assert all(1 <= v <= cfg.model.n_routed_experts for v in r["specialisation/experts_for_90pct_mass"])
    summary = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert summary["step"] == 4 and len(summary["document_domains"]) == 12
    from emo_jax.train.plots import plot_specialisation, read_metrics, specialisation_series
    png = plot_specialisation({"run": specialisation_series(read_metrics(tmp_path))}, tmp_path / "spec.png")
    assert png.stat().st_size > 1000


# ------------------------------------------------------------------ reproduction aggregation

def _row(seed, model, method, k, domain, loss, subset=-1):
    return dict(run_seed=seed, model=model, method=method, K=k, domain=domain, loss=loss, subset_seed=subset)


def test_reproduce_deltas_average_domains_then_seeds():
    rows = []
    for seed, (emo_delta, std_delta) in enumerate([(0.1, 0.5), (0.3, 0.7)]):
        for domain, shift in (("a", 0.0), ("b", 0.2)):
            for model, delta in (("emo", emo_delta), ("stdmoe", std_delta)):
                rows.append(_row(seed, model, "full", 8, domain, 3.0 + shift))
                rows.append(_row(seed, model, "selected", 2, domain, 3.0 + shift + delta + (0.1 if domain == "b" else 0)))
                rows += [_row(seed, model, "random", 2, domain, 3.0 + shift + 1.0 + s, s) for s in (0, 1)]
    deltas = reproduce.loss_deltas(rows)
    table = reproduce.delta_table(deltas, (8, 2))
    get = {(t["model"], t["method"]): t for t in table}
    assert get[("emo", "selected")]["per_seed"] == pytest.approx([0.15, 0.35])
    assert get[("emo", "selected")]["delta_mean"] == pytest.approx(0.25)
    assert get[("emo", "selected")]["delta_std"] == pytest.approx(np.std([0.15, 0.35], ddof=1))
    assert get[("stdmoe", "random")]["delta_mean"] == pytest.approx(1.5)  # mean over random subsets
    analysis = {"emo": [{"centered_cosine": [0.1, 0.2]}, {"centered_cosine": [0.3, 0.4]}],
                "stdmoe": [{"centered_cosine": [0.5, 0.6]}, {"centered_cosine": [0.7, 0.8]}]}
    head = reproduce.headline(table, (8, 2), analysis, seeds=2, wall=12.0)
    assert head["K"] == 2 and head["seeds"] == 2 and head["wall_seconds"] == 12.0
    assert head["emo_selected_delta"] == pytest.approx(0.25) and head["stdmoe_selected_delta"] == pytest.approx(0.65)
    assert head["emo_centered_cosine"] == pytest.approx([0.2, 0.3])
    assert head["stdmoe_centered_cosine"] == pytest.approx([0.6, 0.7])
    assert head["selected_delta_ratio"] == pytest.approx(0.25 / 0.65)
