"""How specialised the experts are (docs/algorithm.md#measuring-specialisation), one document per row.

For every document (its first seq_len tokens) and layer: the mean routing vector
(mean router softmax over its tokens), the routed experts its tokens use (union of
their top-k_r, with the eval-mode pool) and how many those are. Per domain: the mean
routing vector, the cosine similarity between domains' vectors per layer, and the
share of routed assignments each expert gets (usage heatmap).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import routing
from emo_jax.config import Config
from emo_jax.model.moe_block import pool_sizes_for
from emo_jax.modular import probe

Array = jax.Array


def document_routing(router_logits: Array, segment_ids: Array, routed_top_k: int,
                     pool_sizes: Array | None) -> tuple[Array, Array, Array]:
    """One layer, one document per row.

    router_logits f32[B, S, N]; segment_ids i32[B, S] (1 on the document, 0 padding).
    Returns mean router probabilities f32[B, N], experts used bool[B, N] (union of the
    tokens' top-k_r) and routed assignments per expert f32[B, N].
    """
    valid = segment_ids > 0
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    tokens = jnp.maximum(jnp.sum(valid, axis=1), 1)[:, None]
    mean_probs = jnp.sum(jnp.where(valid[..., None], probs, 0.0), axis=1) / tokens
    r = routing.route(router_logits, segment_ids, routed_top_k, pool_sizes, num_segments=segment_ids.shape[1] + 1)
    hits = jax.nn.one_hot(r.expert_ids, router_logits.shape[-1], dtype=jnp.float32)  # [B, S, K, N]
    counts = jnp.sum(jnp.where(valid[..., None, None], hits, 0.0), axis=(1, 2))
    return mean_probs, counts > 0, counts


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows. f[M, N] -> f[M, M]."""
    norm = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    return norm @ norm.T


def mean_off_diagonal(matrix: np.ndarray) -> float:
    m = matrix.shape[0]
    return float((matrix.sum() - np.trace(matrix)) / max(m * (m - 1), 1))


def collect(config: Config, params: Any, batches: Sequence[dict], rows: int) -> list[dict[str, np.ndarray]]:
    """Per layer: mean_probs [rows, N_l], used bool[rows, N_l], counts [rows, N_l]."""
    out = None
    for batch in batches:
        _, router = probe.router_logits(config, params, batch)
        seg = jnp.asarray(batch["segment_ids"])
        pools = pool_sizes_for(config.routing, False, None, seg.shape[0], seg.shape[1] + 1)
        per_layer = [jax.device_get(document_routing(z, seg, config.model.routed_top_k, pools)) for z in router]
        if out is None:
            out = [{"mean_probs": [], "used": [], "counts": []} for _ in per_layer]
        for acc, (p, u, c) in zip(out, per_layer):
            acc["mean_probs"].append(p)
            acc["used"].append(u)
            acc["counts"].append(c)
    return [{k: np.concatenate(v)[:rows] for k, v in acc.items()} for acc in out]


def summarise(per_layer: list[dict[str, np.ndarray]], doc_domains: np.ndarray,
              domains: Sequence[str]) -> dict[str, Any]:
    """Domain means, cosine matrices, usage shares and expert-set sizes per layer."""
    layers = []
    for acc in per_layer:
        means = np.stack([acc["mean_probs"][doc_domains == d].mean(0) for d in range(len(domains))])
        usage = np.stack([acc["counts"][doc_domains == d].sum(0) for d in range(len(domains))])
        usage = usage / np.maximum(usage.sum(-1, keepdims=True), 1.0)
        sizes = acc["used"].sum(-1)
        cos = cosine_matrix(means)
        layers.append({
            "domain_mean_routing": means.tolist(),
            "domain_cosine": cos.tolist(),
            "mean_off_diagonal_cosine": mean_off_diagonal(cos),
            "expert_usage": usage.tolist(),
            "document_expert_set_sizes": sizes.astype(int).tolist(),
            "mean_expert_set_size": {name: float(sizes[doc_domains == d].mean()) for d, name in enumerate(domains)},
            "routed_experts": int(means.shape[-1]),
        })
    return {"domains": list(domains), "document_domains": doc_domains.astype(int).tolist(), "layers": layers}


def write_tables(summary: dict[str, Any], out: Path) -> list[Path]:
    """analysis.json plus CSV tables (cosine, usage, set sizes)."""
    out.mkdir(parents=True, exist_ok=True)
    domains = summary["domains"]
    (out / "analysis.json").write_text(json.dumps(summary, indent=1))
    paths = [out / "analysis.json", out / "domain_cosine.csv", out / "expert_usage.csv", out / "expert_set_sizes.csv"]
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "domain_a", "domain_b", "cosine"])
        for l, layer in enumerate(summary["layers"]):
            for i, a in enumerate(domains):
                for j, b in enumerate(domains):
                    w.writerow([l, a, b, f"{layer['domain_cosine'][i][j]:.4f}"])
    with open(paths[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "domain", "expert", "share"])
        for l, layer in enumerate(summary["layers"]):
            for i, a in enumerate(domains):
                for e, share in enumerate(layer["expert_usage"][i]):
                    w.writerow([l, a, e, f"{share:.5f}"])
    with open(paths[3], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "document", "domain", "experts_used"])
        for l, layer in enumerate(summary["layers"]):
            for doc, (d, size) in enumerate(zip(summary["document_domains"], layer["document_expert_set_sizes"])):
                w.writerow([l, doc, domains[d], size])
    return paths


def plot(summary: dict[str, Any], out: Path, title: str = "") -> list[Path]:
    """domain_cosine.png, expert_usage.png, expert_set_sizes.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, layers = summary["domains"], summary["layers"]
    n = len(layers)
    paths = []

    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1, 3.8), squeeze=False)
    for l, (ax, layer) in enumerate(zip(axes[0], layers)):
        im = ax.imshow(np.asarray(layer["domain_cosine"]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {l}: mean off-diag {layer['mean_off_diagonal_cosine']:.2f}", fontsize=8)
        ax.set_xticks(range(len(domains)), domains, rotation=90, fontsize=6)
        ax.set_yticks(range(len(domains)), domains if l == 0 else [], fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine")
    fig.suptitle(f"{title} domain x domain cosine of mean routing vectors", fontsize=9)
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
        values = [layer["mean_expert_set_size"][d] for d in domains]
        ax.bar(np.arange(len(domains)) + l * width, values, width, label=f"layer {l}")
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, rotation=30, fontsize=7)
    ax.set_ylabel("routed experts used per document")
    ax.legend(fontsize=7)
    ax.set_title(f"{title} per-document expert-set size", fontsize=9)
    paths.append(out / "expert_set_sizes.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def analyze_documents(config: Config, params: Any, texts_by_domain: dict[str, list[str]],
                      batch_size: int | None = None) -> dict[str, Any]:
    """The summary for documents grouped by domain (one row per document)."""
    from emo_jax.modular.documents import one_document_per_row, tokenizer_for
    tok = tokenizer_for(config)
    domains = list(texts_by_domain)
    tokens, doc_domains = [], []
    for d, name in enumerate(domains):
        for t in tok.encode_batch(texts_by_domain[name]):
            if t.size:
                tokens.append(t)
                doc_domains.append(d)
    batches, rows = one_document_per_row(tokens, tok.eos_id, tok.pad_id, config.data.seq_len,
                                         batch_size or config.data.global_batch_size)
    return summarise(collect(config, params, batches, rows), np.asarray(doc_domains), domains)
