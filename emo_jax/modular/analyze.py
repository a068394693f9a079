"""`emo-jax analyze` and the reproduction's analysis: routing of one document per row,
summarised per domain by `emo_jax.specialisation` (the measures are described there and
in docs/reproduction.md), written as JSON/CSV tables and PNG plots.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import Config
from emo_jax.specialisation import (  # noqa: F401  (re-exported: the analysis API)
    SCALAR_METRICS, cosine_matrix, document_routing, experts_for_mass, format_summary, layer_summary,
    mean_off_diagonal, scalar_metrics, summarise)


def write_tables(summary: dict[str, Any], out: Path) -> list[Path]:
    """analysis.json plus CSV tables (cosines, usage, experts for 90% of routing)."""
    out.mkdir(parents=True, exist_ok=True)
    domains = summary["domains"]
    (out / "analysis.json").write_text(json.dumps(summary, indent=1))
    paths = [out / "analysis.json", out / "domain_cosine.csv", out / "expert_usage.csv",
             out / "experts_for_90pct_mass.csv"]
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "domain_a", "domain_b", "cosine", "centered_cosine"])
        for l, layer in enumerate(summary["layers"]):
            for i, a in enumerate(domains):
                for j, b in enumerate(domains):
                    w.writerow([l, a, b, f"{layer['domain_cosine'][i][j]:.4f}",
                                f"{layer['centered_cosine_matrix'][i][j]:.4f}"])
    with open(paths[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "domain", "expert", "share"])
        for l, layer in enumerate(summary["layers"]):
            for i, a in enumerate(domains):
                for e, share in enumerate(layer["expert_usage"][i]):
                    w.writerow([l, a, e, f"{share:.5f}"])
    with open(paths[3], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "document", "domain", "experts_for_90pct_mass"])
        for l, layer in enumerate(summary["layers"]):
            for doc, (d, size) in enumerate(zip(summary["document_domains"],
                                                layer["document_experts_for_90pct_mass"])):
                w.writerow([l, doc, domains[d], size])
    return paths


def plot(summary: dict[str, Any], out: Path, title: str = "") -> list[Path]:
    """domain_cosine.png (raw and centred), expert_usage.png, experts_for_90pct_mass.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, layers = summary["domains"], summary["layers"]
    n = len(layers)
    paths = []

    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1, 7.4), squeeze=False)
    for row, (key, mean_key, vmin, label) in enumerate((("domain_cosine", "mean_domain_cosine", 0, "cosine"),
                                                         ("centered_cosine_matrix", "mean_centered_cosine", -1,
                                                          "centred cosine"))):
        for l, (ax, layer) in enumerate(zip(axes[row], layers)):
            im = ax.imshow(np.asarray(layer[key]), vmin=vmin, vmax=1, cmap="viridis")
            ax.set_title(f"layer {l}: {label} {layer[mean_key]:.2f}", fontsize=8)
            ax.set_xticks(range(len(domains)), domains if row == 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(len(domains)), domains if l == 0 else [], fontsize=6)
        fig.colorbar(im, ax=axes[row].tolist(), shrink=0.8, label=label)
    fig.suptitle(f"{title} domain x domain cosine of mean routing vectors (top: raw, bottom: minus uniform)",
                 fontsize=9)
    paths.append(out / "domain_cosine.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(n, 1, figsize=(10, 1.9 * n + 0.6), squeeze=False)
    for l, (ax, layer) in enumerate(zip(axes[:, 0], layers)):
        im = ax.imshow(np.asarray(layer["expert_usage"]), aspect="auto", cmap="magma")
        ax.set_yticks(range(len(domains)), domains, fontsize=6)
        ax.set_ylabel(f"layer {l}", fontsize=8)
        fig.colorbar(im, ax=ax, label="share")
    axes[-1, 0].set_xlabel("routed expert")
    fig.suptitle(f"{title} expert usage (share of routed assignments per domain)", fontsize=9)
    paths.append(out / "expert_usage.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / n
    for l, layer in enumerate(layers):
        values = [layer["experts_for_90pct_mass"].get(d, np.nan) for d in domains]
        ax.bar(np.arange(len(domains)) + l * width, values, width, label=f"layer {l}")
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, rotation=30, fontsize=7)
    ax.set_ylabel("experts holding 90% of routing")
    ax.legend(fontsize=7)
    ax.set_title(f"{title} experts holding 90% of a document's routing mass (of {layers[0]['routed_experts']})",
                 fontsize=9)
    paths.append(out / "experts_for_90pct_mass.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def analyze_documents(config: Config, params: Any, texts_by_domain: dict[str, list[str]],
                      batch_size: int | None = None) -> dict[str, Any]:
    """The summary for documents grouped by domain (one row per document), with the same
    routing step as the training loop's validation (train/evaluate.py)."""
    from emo_jax.model import build_model
    from emo_jax.modular.documents import one_document_per_row, tokenizer_for
    from emo_jax.train.evaluate import make_routing_step, routing_summary
    tok = tokenizer_for(config)
    domains = list(texts_by_domain)
    tokens, doc_domains = [], []
    for d, name in enumerate(domains):
        for t in tok.encode_batch(texts_by_domain[name]):
            if t.size:
                tokens.append(t)
                doc_domains.append(d)
    batches, _ = one_document_per_row(tokens, tok.eos_id, tok.pad_id, config.data.seq_len,
                                      batch_size or config.data.global_batch_size)
    step = jax.jit(make_routing_step(build_model(config), config))
    return routing_summary(step, params, batches, np.asarray(doc_domains), tuple(domains),
                           lambda batch: {k: jnp.asarray(v) for k, v in batch.items()})
