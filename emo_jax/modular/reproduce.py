"""EMO's headline at small scale: per-domain pruning curves, EMO vs standard MoE.

Two models that differ only in the routing objective (EMO's document pool vs none,
same load-balance scope, data, seed and steps) are trained on the bundled corpus;
then for every domain and K in {E, E/2, E/4, E/8}: experts are selected on a few
training documents of that domain, the model is pruned to K, and that domain's
held-out (validation) loss is measured; random subsets of the same size are the
baseline. Writes results.json/.csv, a markdown table and loss_vs_k.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from emo_jax.config import Config, replace
from emo_jax.modular import ModularError, analyze, documents
from emo_jax.modular.checkpoints import checkpoint_dir, load_model, read_config
from emo_jax.modular.evaluate import heldout_loss
from emo_jax.modular.prune import prune
from emo_jax.modular.select import greedy_selection, random_selection

MODELS = ("emo", "stdmoe")


@dataclasses.dataclass(frozen=True)
class Options:
    keep: tuple[int, ...] = ()  # K values; () = E, E/2, E/4, E/8 (those >= top_k)
    calibration_docs: int = 4
    calibration_batches: int = 1
    eval_batches: int = 4
    random_seeds: int = 2
    method: str = "probability"
    analysis_docs: int = 16
    domains: tuple[str, ...] = ()


def twin_configs(config: Config, out: Path) -> dict[str, Config]:
    """The EMO config and its standard-MoE twin (routing.pool=none, all else equal)."""
    if config.routing.pool == "none":
        raise ModularError("reproduce needs an EMO config (routing.pool random or fixed); the standard-MoE "
                           "twin is derived from it with routing.pool=none.")
    every = config.train.checkpoint_every or config.train.steps  # the final step must be saved
    return {
        "emo": replace(config, train={"run_dir": str(out / "emo"), "checkpoint_every": every},
                       name=f"{config.name}_emo"),
        "stdmoe": replace(config, routing={"pool": "none"}, train={"run_dir": str(out / "stdmoe"),
                                                                   "checkpoint_every": every},
                          name=f"{config.name}_stdmoe"),
    }


def default_keep(config: Config) -> tuple[int, ...]:
    e = config.model.n_experts
    return tuple(k for k in (e, e // 2, e // 4, e // 8) if k >= config.model.top_k)


def _trained(config: Config) -> bool:
    try:
        _, step = read_config(config.train.run_dir)
    except ModularError:
        return False
    return step >= config.train.steps


def train_twins(configs: dict[str, Config], log: Callable[[str], None]) -> dict[str, float]:
    """Trains (or resumes) both models; returns seconds spent per model."""
    from emo_jax.train.loop import train
    seconds = {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        if _trained(cfg):
            log(f"{name}: already trained in {cfg.train.run_dir}")
        else:
            log(f"{name}: training {cfg.train.steps} steps into {cfg.train.run_dir}")
            if train(cfg).stopped_by_signal:
                raise ModularError(f"{name} training was stopped by SIGTERM (checkpoint saved); run the same "
                                   "command again to resume.")
        seconds[name] = time.perf_counter() - start
    return seconds


def domain_data(config: Config, domains: Sequence[str], opts: Options) -> tuple[dict, dict]:
    """Calibration batches (first training documents) and held-out batches per domain."""
    calib, heldout = {}, {}
    d = config.data
    for domain in domains:
        texts = documents.domain_documents(d.data_dir, d.dataset, domain, "train", opts.calibration_docs)
        calib[domain] = documents.text_batches(texts, config, opts.calibration_batches)
        texts = documents.domain_documents(d.data_dir, d.dataset, domain, "validation")
        heldout[domain] = documents.text_batches(texts, config, opts.eval_batches)
    return calib, heldout


def pruning_curve(name: str, config: Config, params: Any, domain: str, calib: list, heldout: list,
                  keep_values: Sequence[int], opts: Options) -> list[dict]:
    """Rows (model, method, domain, K, seed, loss, perplexity) for one model and domain."""
    L = config.model.n_layers
    rows = []
    for k in keep_values:
        if k == config.model.n_experts:
            r = heldout_loss(config, params, heldout)
            rows.append(dict(model=name, method="full", domain=domain, K=k, seed=-1, **r))
            continue
        selection = greedy_selection(config, params, calib, (k,) * L, opts.method, source=domain)
        r = heldout_loss(*prune(config, params, selection.keep), heldout)
        rows.append(dict(model=name, method="selected", domain=domain, K=k, seed=-1, **r))
        for seed in range(opts.random_seeds):
            selection = random_selection(config, (k,) * L, seed)
            r = heldout_loss(*prune(config, params, selection.keep), heldout)
            rows.append(dict(model=name, method="random", domain=domain, K=k, seed=seed, **r))
    return rows


def mean_table(rows: list[dict], keep_values: Sequence[int]) -> list[dict]:
    """Mean held-out loss over domains per (model, method, K); K = E counts as every method."""
    table = []
    for k in keep_values:
        entry = {"K": k}
        for model in MODELS:
            for method in ("selected", "random"):
                use = [r["loss"] for r in rows if r["model"] == model and r["K"] == k
                       and r["method"] in (method, "full")]
                entry[f"{model}_{method}"] = float(np.mean(use)) if use else float("nan")
        table.append(entry)
    return table


def markdown(table: list[dict], rows: list[dict], domains: Sequence[str], keep_values: Sequence[int]) -> str:
    cols = [f"{m}_{s}" for m in MODELS for s in ("selected", "random")]
    full = {m: table[0][f"{m}_selected"] for m in MODELS}
    lines = ["Mean held-out CE (nats/token) over domains; in brackets the change from the full model.", "",
             "| K | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for entry in table:
        cells = [f"{entry[c]:.3f} ({entry[c] - full[c.split('_')[0]]:+.3f})" for c in cols]
        lines.append(f"| {entry['K']} | " + " | ".join(cells) + " |")
    lines += ["", "Per domain, selected experts: EMO / standard MoE held-out CE.", "",
              "| domain | " + " | ".join(f"K={k}" for k in keep_values) + " |", "|---|" + "---|" * len(keep_values)]
    for domain in domains:
        cells = []
        for k in keep_values:
            get = {m: [r["loss"] for r in rows if r["model"] == m and r["domain"] == domain and r["K"] == k
                       and r["method"] in ("selected", "full")] for m in MODELS}
            cells.append(" / ".join(f"{get[m][0]:.3f}" if get[m] else "-" for m in MODELS))
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], domains: Sequence[str], keep_values: Sequence[int], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean over domains", *domains]
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(12, 3.2 * -(-len(panels) // cols)),
                             squeeze=False)
    styles = {("emo", "selected"): ("C0", "-", "EMO, selected"), ("emo", "random"): ("C0", ":", "EMO, random"),
              ("stdmoe", "selected"): ("C3", "-", "std MoE, selected"),
              ("stdmoe", "random"): ("C3", ":", "std MoE, random")}
    for ax, panel in zip(axes.flat, panels):
        for (model, method), (color, ls, label) in styles.items():
            ys = []
            for k in keep_values:
                use = [r["loss"] for r in rows if r["model"] == model and r["K"] == k
                       and r["method"] in (method, "full") and (panel == panels[0] or r["domain"] == panel)]
                ys.append(np.mean(use) if use else np.nan)
            ax.plot(keep_values, ys, ls, color=color, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(keep_values), [str(k) for k in keep_values])
        ax.invert_xaxis()
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("K experts kept per layer")
        ax.set_ylabel("held-out CE")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(config: Config, out: str | Path, opts: Options = Options(), log: Callable[[str], None] = print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    configs = twin_configs(config, out)
    train_seconds = train_twins(configs, log)
    keep_values = tuple(sorted(opts.keep or default_keep(config), reverse=True))
    domains = opts.domains or documents.dataset_domains(config.data.data_dir, config.data.dataset)
    models = {}
    for name, cfg in configs.items():
        loaded, params, _ = load_model(checkpoint_dir(cfg.train.run_dir))
        models[name] = (loaded, params)
    calib, heldout = domain_data(configs["emo"], domains, opts)
    rows, analysis = [], {}
    for name, (cfg, params) in models.items():
        for domain in domains:
            t = time.perf_counter()
            rows += pruning_curve(name, cfg, params, domain, calib[domain], heldout[domain], keep_values, opts)
            log(f"{name} {domain}: " + "  ".join(f"{r['method']}[K={r['K']}] {r['loss']:.3f}" for r in rows
                                                 if r["model"] == name and r["domain"] == domain)
                + f"  ({time.perf_counter() - t:.0f}s)")
        texts = {d: documents.domain_documents(cfg.data.data_dir, cfg.data.dataset, d, "validation",
                                               opts.analysis_docs) for d in domains}
        summary = analyze.analyze_documents(cfg, params, texts)
        analyze.write_tables(summary, out / f"analysis_{name}")
        analyze.plot(summary, out / f"analysis_{name}", title=name)
        analysis[name] = {
            "mean_off_diagonal_cosine": [layer["mean_off_diagonal_cosine"] for layer in summary["layers"]],
            "mean_expert_set_size": [float(np.mean(list(layer["mean_expert_set_size"].values())))
                                     for layer in summary["layers"]],
        }
    table = mean_table(rows, keep_values)
    result = {"config": config.name, "keep": list(keep_values), "domains": list(domains),
              "options": dataclasses.asdict(opts), "train_seconds": train_seconds,
              "total_seconds": time.perf_counter() - start, "mean_table": table, "analysis": analysis, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(table, rows, domains, keep_values)
    text += "\nRouting specialisation on validation documents (per layer):\n\n"
    for name, a in analysis.items():
        text += (f"- {name}: mean off-diagonal domain cosine "
                 + ", ".join(f"{v:.2f}" for v in a["mean_off_diagonal_cosine"])
                 + "; routed experts used per document " + ", ".join(f"{v:.1f}" for v in a["mean_expert_set_size"])
                 + "\n")
    (out / "table.md").write_text(text)
    png = plot_curves(rows, domains, keep_values, out / "loss_vs_k.png",
                      f"{config.name}: held-out CE of each domain after pruning to K experts")
    log(text)
    log(f"wrote {out / 'results.json'}, {out / 'table.md'}, {png} in {result['total_seconds']:.0f}s")
    return result
