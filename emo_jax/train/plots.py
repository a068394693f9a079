"""The run's pictures, from run_dir/metrics.jsonl: the loss curve and specialisation
over training (the eval rows' `specialisation/*` per-layer measures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emo_jax.specialisation import SCALAR_METRICS

TITLES = {
    "domain_cosine": "domain cosine of mean routing",
    "centered_cosine": "centred domain cosine (minus uniform)",
    "usage_cosine": "domain cosine of top-k usage",
    "experts_for_90pct_mass": "experts holding 90% of a document's routing",
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss_curve(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Train CE (mean over each log window) and validation CE against the step."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r.get("split") == "train"]
    eval_rows = [r for r in rows if r.get("split") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["cross_entropy"] for r in train_rows],
            label="train CE (mean over the log window)")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-",
                label="validation CE (balanced over domains)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def specialisation_series(rows: list[dict]) -> dict[str, tuple[list[int], list[list[float]]]]:
    """measure -> (eval steps, per-layer values at each step), from metrics rows."""
    out = {}
    evals = [r for r in rows if r.get("split") == "eval" and f"specialisation/{SCALAR_METRICS[0]}" in r]
    for name in SCALAR_METRICS:
        out[name] = ([r["step"] for r in evals], [r[f"specialisation/{name}"] for r in evals])
    return out


def mean_series(all_series: list[dict]) -> dict:
    """The mean of several runs' `specialisation_series` at the steps they all have."""
    out = {}
    for name in SCALAR_METRICS:
        common = sorted(set.intersection(*(set(s[name][0]) for s in all_series))) if all_series else []
        values = [np.mean([s[name][1][s[name][0].index(step)] for s in all_series], axis=0).tolist()
                  for step in common]
        out[name] = (common, values)
    return out


def plot_specialisation(series: dict[str, dict], out: str | Path, title: str = "") -> Path | None:
    """One panel per measure, one line per (label, layer): how specialisation develops
    over training. `series` maps a label to a `specialisation_series` (or `mean_series`).
    None when there is nothing to plot (no evaluation with specialisation measures)."""
    plt = _pyplot()
    if not any(s[SCALAR_METRICS[0]][0] for s in series.values()):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, name in zip(axes.flat, SCALAR_METRICS):
        for r, (label, s) in enumerate(series.items()):
            steps, values = s[name]
            if not steps:
                continue
            for layer in range(len(values[0])):
                ax.plot(steps, [v[layer] for v in values], color=f"C{r}", alpha=0.35 + 0.65 * (layer + 1) /
                        len(values[0]), marker="o", ms=3, label=f"{label} layer {layer}")
        ax.set_title(TITLES[name], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title} specialisation over training (validation documents; lower = more specialised)",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
