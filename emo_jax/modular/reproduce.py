"""EMO's headline at small scale: per-domain pruning curves, EMO vs standard MoE.

For every seed, two models that differ only in the routing objective (EMO's document
pool vs none; same load-balance scope, data order, initialisation seed and steps) are
trained on the bundled corpus; then for every domain and K in {E, E/2, E/4, E/8}:
experts are selected on a few training documents of that domain, the model is pruned
to K, and that domain's held-out (validation) loss is measured; random subsets of
the same size are the baseline. The change from the unpruned model ("delta") is
averaged over domains, then mean and standard deviation are taken over seeds.
Writes results.json (with a `headline`), results.csv, table.md, loss_vs_k.png and
specialisation_over_training.png. Finished trainings are reused: rerunning with more
seeds trains only the new ones.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from emo_jax import artifact
from emo_jax.config import Config, replace
from emo_jax.modular import ModularError, analyze, documents
from emo_jax.modular.evaluate import heldout_loss
from emo_jax.modular.prune import prune
from emo_jax.modular.select import greedy_selection, random_selection

MODELS = ("emo", "stdmoe")


@dataclasses.dataclass(frozen=True)
class Options:
    keep: tuple[int, ...] = ()  # K values; () = E, E/2, E/4, E/8 (those >= top_k)
    seeds: int = 1  # training seeds (train.seed and data.seed = config's seed + i)
    calibration_docs: int = 4
    calibration_batches: int = 1
    eval_batches: int = 4
    random_seeds: int = 2
    method: str = "probability"
    analysis_docs: int = 16
    domains: tuple[str, ...] = ()


def twin_configs(config: Config, out: Path, seed: int = 0) -> dict[str, Config]:
    """The EMO config and its standard-MoE twin (routing.pool=none, all else equal), for
    training seed `seed`: both use train.seed = data.seed = the config's + seed, so the
    twins see the same batches in the same order."""
    if config.routing.pool == "none":
        raise ModularError("reproduce needs an EMO config (routing.pool random or fixed); the standard-MoE "
                           "twin is derived from it with routing.pool=none.")
    every = config.train.checkpoint_every or config.train.steps  # the final step must be saved
    data = {"seed": config.data.seed + seed}
    train = {"seed": config.train.seed + seed, "checkpoint_every": every}
    return {
        "emo": replace(config, data=data, train={**train, "run_dir": str(out / "emo")},
                       name=f"{config.name}_emo"),
        "stdmoe": replace(config, routing={"pool": "none"}, data=data,
                          train={**train, "run_dir": str(out / "stdmoe")}, name=f"{config.name}_stdmoe"),
    }


def default_keep(config: Config) -> tuple[int, ...]:
    e = config.model.n_experts
    return tuple(k for k in (e, e // 2, e // 4, e // 8) if k >= config.model.top_k)


def _trained(config: Config) -> bool:
    try:
        step = artifact.resolve(config.train.run_dir).step
    except artifact.ArtifactError:
        return False
    return step is not None and step >= config.train.steps


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
                raise ModularError(f"{name} training was stopped by a signal (SIGTERM or Ctrl-C; checkpoint saved); run the same "
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
            rows.append(dict(model=name, method="full", domain=domain, K=k, subset_seed=-1, **r))
            continue
        selection = greedy_selection(config, params, calib, (k,) * L, opts.method, source=domain)
        r = heldout_loss(*prune(config, params, selection.keep), heldout)
        rows.append(dict(model=name, method="selected", domain=domain, K=k, subset_seed=-1, **r))
        for seed in range(opts.random_seeds):
            selection = random_selection(config, (k,) * L, seed)
            r = heldout_loss(*prune(config, params, selection.keep), heldout)
            rows.append(dict(model=name, method="random", domain=domain, K=k, subset_seed=seed, **r))
    return rows


def loss_deltas(rows: list[dict]) -> list[dict]:
    """Held-out loss change from the unpruned model, per (run_seed, model, method, K,
    domain); random subsets are averaged first."""
    full = {(r["run_seed"], r["model"], r["domain"]): r["loss"] for r in rows if r["method"] == "full"}
    groups: dict[tuple, list[float]] = collections.defaultdict(list)
    for r in rows:
        if r["method"] != "full":
            groups[(r["run_seed"], r["model"], r["method"], r["K"], r["domain"])].append(r["loss"])
    return [dict(run_seed=s, model=m, method=method, K=k, domain=d, delta=float(np.mean(v)) - full[(s, m, d)])
            for (s, m, method, k, d), v in groups.items()]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def delta_table(deltas: list[dict], keep_values: Sequence[int], domain: str | None = None) -> list[dict]:
    """Per (model, method, K): the delta averaged over domains (or of one domain) for
    every seed, then mean and standard deviation (ddof=1) over seeds."""
    table = []
    for k in keep_values:
        for model in MODELS:
            for method in ("selected", "random"):
                use = [d for d in deltas if d["model"] == model and d["method"] == method and d["K"] == k
                       and (domain is None or d["domain"] == domain)]
                if not use:
                    continue
                seeds = sorted({d["run_seed"] for d in use})
                per_seed = [float(np.mean([d["delta"] for d in use if d["run_seed"] == s])) for s in seeds]
                mean, std = _mean_std(per_seed)
                table.append(dict(model=model, method=method, K=k, delta_mean=mean, delta_std=std,
                                  per_seed=per_seed))
    return table


def headline(table: list[dict], keep_values: Sequence[int], analysis: dict, seeds: int, wall: float) -> dict:
    """The numbers a reader looks at first: the delta at the smallest K (E/8 by default)
    with selected experts, and the final centred domain cosine per layer."""
    k = min(keep_values)
    get = {(t["model"], t["method"]): t for t in table if t["K"] == k}
    out: dict[str, Any] = {"K": k}
    for model in MODELS:
        for method in ("selected", "random"):
            entry = get.get((model, method))
            out[f"{model}_{method}_delta"] = entry["delta_mean"] if entry else float("nan")
            out[f"{model}_{method}_delta_std"] = entry["delta_std"] if entry else float("nan")
        per_seed = np.asarray([a["centered_cosine"] for a in analysis[model]])  # [seeds, layers]
        out[f"{model}_centered_cosine"] = per_seed.mean(0).tolist()
        out[f"{model}_centered_cosine_std"] = per_seed.std(0, ddof=1).tolist() if len(per_seed) > 1 else \
            [0.0] * per_seed.shape[1]
    out["selected_delta_ratio"] = out["emo_selected_delta"] / out["stdmoe_selected_delta"] \
        if out["stdmoe_selected_delta"] > 0 else float("nan")
    out["seeds"] = seeds
    out["wall_seconds"] = wall
    return out


def markdown(table: list[dict], deltas: list[dict], head: dict, analysis: dict, domains: Sequence[str],
             keep_values: Sequence[int]) -> str:
    pm = lambda m, s: f"{m:+.3f} ± {s:.3f}"  # noqa: E731
    seeds = head["seeds"]
    lines = [f"Held-out CE change from the unpruned model (nats/token), mean over domains; mean ± std over "
             f"{seeds} seed(s).", "", "| K | EMO selected | std MoE selected | EMO random | std MoE random |",
             "|---|---|---|---|---|"]
    get = {(t["model"], t["method"], t["K"]): t for t in table}
    for k in keep_values:
        if not any(key[2] == k for key in get):
            continue
        cells = [pm(get[(m, meth, k)]["delta_mean"], get[(m, meth, k)]["delta_std"])
                 for meth in ("selected", "random") for m in MODELS]
        lines.append(f"| {k} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    lines += ["", "Per domain, selected experts, mean over seeds: EMO / standard MoE delta.", "",
              "| domain | " + " | ".join(f"K={k}" for k in keep_values if k != max(keep_values)) + " |",
              "|---|" + "---|" * (len(keep_values) - 1)]
    for domain in domains:
        cells = []
        for k in keep_values:
            if k == max(keep_values):
                continue
            vals = [np.mean([d["delta"] for d in deltas if d["model"] == m and d["domain"] == domain
                             and d["K"] == k and d["method"] == "selected"]) for m in MODELS]
            cells.append(f"{vals[0]:+.3f} / {vals[1]:+.3f}")
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    lines += ["", "Routing specialisation on validation documents, final checkpoint, mean over seeds, per layer "
              "(lower = more specialised):", ""]
    for name in MODELS:
        for metric in ("domain_cosine", "centered_cosine", "usage_cosine", "experts_for_90pct_mass"):
            per_layer = np.mean([a[metric] for a in analysis[name]], axis=0)
            lines.append(f"- {name} {metric}: " + ", ".join(f"{v:.3f}" for v in per_layer))
    lines += ["", f"Headline (K = {head['K']}, selected): EMO {pm(head['emo_selected_delta'], head['emo_selected_delta_std'])}"
              f", standard MoE {pm(head['stdmoe_selected_delta'], head['stdmoe_selected_delta_std'])} nats; "
              f"ratio {head['selected_delta_ratio']:.2f}; {seeds} seed(s), {head['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


STYLES = {("emo", "selected"): ("C0", "-", "EMO, selected"), ("emo", "random"): ("C0", ":", "EMO, random"),
          ("stdmoe", "selected"): ("C3", "-", "std MoE, selected"),
          ("stdmoe", "random"): ("C3", ":", "std MoE, random")}


def plot_curves(deltas: list[dict], domains: Sequence[str], keep_values: Sequence[int], path: Path,
                title: str) -> Path:
    """Held-out loss change vs K (the unpruned K = E is 0), mean ± std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean over domains", *domains]
    cols = 3
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 3.2 * nrows), squeeze=False)
    e = max(keep_values)
    for ax, panel in zip(axes.flat, panels):
        table = delta_table(deltas, keep_values, None if panel == panels[0] else panel)
        for (model, method), (color, ls, label) in STYLES.items():
            ks = [e] + [t["K"] for t in table if (t["model"], t["method"]) == (model, method)]
            ys = [0.0] + [t["delta_mean"] for t in table if (t["model"], t["method"]) == (model, method)]
            err = [0.0] + [t["delta_std"] for t in table if (t["model"], t["method"]) == (model, method)]
            ax.errorbar(ks, ys, yerr=err, fmt="o", ls=ls, color=color, label=label, capsize=3, ms=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(keep_values), [str(k) for k in keep_values])
        ax.invert_xaxis()
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("K experts kept per layer")
        ax.set_ylabel("held-out CE change (nats)")
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
    from emo_jax.train.plots import mean_series, plot_specialisation, read_metrics, specialisation_series
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    keep_values = tuple(sorted(opts.keep or default_keep(config), reverse=True))
    domains = opts.domains or documents.dataset_domains(config.data.data_dir, config.data.dataset)
    rows: list[dict] = []
    analysis: dict[str, list[dict]] = {name: [] for name in MODELS}
    train_seconds: dict[str, dict[str, float]] = {}
    calib = heldout = None
    for seed in range(opts.seeds):
        seed_dir = out / f"seed_{seed}"
        configs = twin_configs(config, seed_dir, seed)
        train_seconds[str(seed)] = train_twins(configs, log)
        if calib is None:
            calib, heldout = domain_data(configs["emo"], domains, opts)
        for name, twin in configs.items():
            loaded = artifact.load(twin.train.run_dir)
            cfg, params = loaded.config, loaded.params
            for domain in domains:
                t = time.perf_counter()
                curve = pruning_curve(name, cfg, params, domain, calib[domain], heldout[domain], keep_values, opts)
                rows += [dict(r, run_seed=seed) for r in curve]
                log(f"seed {seed} {name} {domain}: " + "  ".join(f"{r['method']}[K={r['K']}] {r['loss']:.3f}"
                                                                 for r in curve)
                    + f"  ({time.perf_counter() - t:.0f}s)")
            texts = {d: documents.domain_documents(cfg.data.data_dir, cfg.data.dataset, d, "validation",
                                                   opts.analysis_docs) for d in domains}
            summary = analyze.analyze_documents(cfg, params, texts)
            analyze.write_tables(summary, seed_dir / f"analysis_{name}")
            analyze.plot(summary, seed_dir / f"analysis_{name}", title=f"{name} seed {seed}")
            analysis[name].append(analyze.scalar_metrics(summary))
    deltas = loss_deltas(rows)
    table = delta_table(deltas, keep_values)
    wall = time.perf_counter() - start
    head = headline(table, keep_values, analysis, opts.seeds, wall)
    result = {"headline": head, "config": config.name, "keep": list(keep_values), "domains": list(domains),
              "options": dataclasses.asdict(opts), "train_seconds": train_seconds, "delta_table": table,
              "analysis": analysis, "deltas": deltas, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(table, deltas, head, analysis, domains, keep_values)
    (out / "table.md").write_text(text)
    png = plot_curves(deltas, domains, keep_values, out / "loss_vs_k.png",
                      f"{config.name}: held-out CE change of each domain after pruning to K experts "
                      f"(mean ± std over {opts.seeds} seed(s))")
    series = {label: mean_series([specialisation_series(read_metrics(out / f"seed_{s}" / name))
                                  for s in range(opts.seeds)])
              for name, label in (("emo", "EMO"), ("stdmoe", "std MoE"))}
    spec_png = plot_specialisation(series, out / "specialisation_over_training.png",
                                   title=f"{config.name} (mean over {opts.seeds} seed(s))")
    log(text)
    log(f"wrote {out / 'results.json'}, {out / 'table.md'}, {png}"
        + (f", {spec_png}" if spec_png else "") + f" in {wall:.0f}s")
    return result
