"""How specialised the experts are (docs/reproduction.md, "The measures").

Input: one document per row (its first seq_len tokens). For every document and layer:
the mean routing vector (mean router softmax over its tokens) and its routed
assignments per expert (the tokens' top-k_r, with the eval-mode pool). From those,
per layer:
- `domain_cosine`: cosine similarity between the domains' mean routing vectors (the
  paper's measure; close to 1 whenever the router is near uniform, so at small scale
  it hides most of the structure);
- `centered_cosine`: the same after subtracting the uniform vector 1/N from every
  domain vector (how alike the domains' *deviations* from uniform routing are);
- `usage_cosine`: cosine between the domains' top-k usage (share of routed
  assignments per expert), i.e. what pruning actually removes;
- `experts_for_90pct_mass`: per document, how many experts hold 90% of its routing
  mass (its mean routing vector, sorted). A document of a few hundred tokens touches
  almost every expert through top-k, so the count of experts *used* says nothing;
  this count shows how concentrated a document's routing is.
Lower is more specialised for all four. `summarise` computes them; the training
loop's periodic validation and `emo-jax analyze` / `reproduce` all call it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax import routing

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


def experts_for_mass(vectors: np.ndarray, fraction: float = 0.9) -> np.ndarray:
    """Per row, the fewest entries (largest first) whose sum reaches `fraction` of the
    row's total. f[M, N] -> i[M] in [1, N] (a uniform row over N needs ceil(0.9 N))."""
    v = np.sort(np.asarray(vectors, np.float64), axis=-1)[..., ::-1]
    cumulative = np.cumsum(v, axis=-1)
    target = fraction * cumulative[..., -1:] * (1 - 1e-9)  # rounding must not push past the row
    return 1 + np.sum(cumulative < target, axis=-1)


SCALAR_METRICS = ("domain_cosine", "centered_cosine", "usage_cosine", "experts_for_90pct_mass")


def layer_summary(mean_probs: np.ndarray, counts: np.ndarray, doc_domains: np.ndarray,
                  domains: Sequence[str]) -> dict[str, Any]:
    """One layer's specialisation measures (see the module docstring).

    mean_probs f[docs, N] (rows sum to 1), counts f[docs, N] (routed assignments),
    doc_domains i[docs] indexing `domains`. Domains without a document are left out
    of the cross-domain means.
    """
    n = mean_probs.shape[-1]
    present = [d for d in range(len(domains)) if np.any(doc_domains == d)]
    means = np.stack([mean_probs[doc_domains == d].mean(0) if d in present else np.full(n, np.nan)
                      for d in range(len(domains))])
    usage = np.stack([counts[doc_domains == d].sum(0) for d in range(len(domains))])
    usage = usage / np.maximum(usage.sum(-1, keepdims=True), 1.0)
    idx = np.asarray(present)
    cos = cosine_matrix(np.nan_to_num(means))
    centered = cosine_matrix(np.nan_to_num(means - 1.0 / n))
    usage_cos = cosine_matrix(usage)
    mass90 = experts_for_mass(mean_probs, 0.9)
    sub = lambda m: m[np.ix_(idx, idx)]  # noqa: E731
    return {
        "routed_experts": int(n),
        "domain_mean_routing": means.tolist(),
        "domain_cosine": cos.tolist(),
        "centered_cosine_matrix": centered.tolist(),
        "expert_usage": usage.tolist(),
        "mean_domain_cosine": mean_off_diagonal(sub(cos)),
        "mean_centered_cosine": mean_off_diagonal(sub(centered)),
        "mean_usage_cosine": mean_off_diagonal(sub(usage_cos)),
        "document_experts_for_90pct_mass": mass90.astype(int).tolist(),
        "experts_for_90pct_mass": {domains[d]: float(mass90[doc_domains == d].mean()) for d in present},
        "mean_experts_for_90pct_mass": float(mass90.mean()),
    }


def summarise(per_layer: list[dict[str, np.ndarray]], doc_domains: np.ndarray,
              domains: Sequence[str]) -> dict[str, Any]:
    """Every layer's `layer_summary`, plus the documents' domains."""
    doc_domains = np.asarray(doc_domains)
    layers = [layer_summary(acc["mean_probs"], acc["counts"], doc_domains, domains) for acc in per_layer]
    return {"domains": list(domains), "document_domains": doc_domains.astype(int).tolist(), "layers": layers}


def scalar_metrics(summary: dict[str, Any]) -> dict[str, list[float]]:
    """Per-layer lists of the four measures (for metrics.jsonl / TensorBoard)."""
    key = {"domain_cosine": "mean_domain_cosine", "centered_cosine": "mean_centered_cosine",
           "usage_cosine": "mean_usage_cosine", "experts_for_90pct_mass": "mean_experts_for_90pct_mass"}
    return {name: [float(layer[key[name]]) for layer in summary["layers"]] for name in SCALAR_METRICS}


def format_summary(summary: dict[str, Any]) -> str:
    """Console lines: the four measures per layer, then the per-domain 90%-mass counts."""
    lines = []
    for l, layer in enumerate(summary["layers"]):
        lines.append(f"layer {l}: domain cosine {layer['mean_domain_cosine']:.3f}  centred cosine "
                     f"{layer['mean_centered_cosine']:.3f}  top-k usage cosine {layer['mean_usage_cosine']:.3f}  "
                     f"experts for 90% of a document's routing {layer['mean_experts_for_90pct_mass']:.1f} "
                     f"of {layer['routed_experts']}")
    per_domain = summary["layers"][-1]["experts_for_90pct_mass"]
    lines.append(f"last layer, experts for 90% of a document's routing per domain: "
                 + ", ".join(f"{k} {v:.1f}" for k, v in per_domain.items()))
    return "\n".join(lines)
