"""Where a CPU step goes, piece by piece, at issue 16's shapes (the numbers behind
BUILD_NOTES.md, "Fourth session").

  bash -c 'source launch/allocator.sh; emo_preload_allocator; PYTHONPATH=. JAX_PLATFORMS=cpu \
      .venv/bin/python benchmarks/bench_cpu_parts.py'     (the launch allocator; a few minutes)
  ... benchmarks/bench_cpu_parts.py --sections projection combine --repeats 5

Sections (each a table, median of --repeats calls after two untimed ones, every input
passed as an argument so that XLA cannot fold it):
  projection  a weight matmul x [B, S, D] @ w [D, E] as the batched einsum and as
              `layers.project` (one 2-D matmul), jit(grad) of both arguments
  combine     the MoE unsort + gate sum as a scatter (`zeros.at[order].set`) and as
              `reference.combine` (row gathers), forward
  moe         one MoE layer (standard routing, capacity backend): routing, the expert
              layer from tokens to tokens, its SwiGLU alone, forward and
              forward+backward, next to a dense SwiGLU over the same T*K rows
  attention   blocked attention with 128- and 64-row tiles, one document per row and
              64-token documents (and one 2048-token row), forward and forward+backward,
              by default (the unrolled path where it is chosen) and by the loops only
  sort        the expert sort of the T*K token copies: stable argsort against
              `reference.stable_order_of_small_keys` (one packed int32 sort)
  overflow    the capacity backend's overflow loop: blocks of R rows, each with its
              expert's weights, forward and backward, against the slab, per block size
  torch       torch's causal SDPA, transformers' OlmoeSparseMoeBlock and the LM head
              matmul, forward at S2, next to jax's head matmul (with the interop extra;
              skipped without torch)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.accelcheck.timing import time_call
from emo_jax.kernels import capacity, reference
from emo_jax.kernels.attention_blocked import blocked_attention
from emo_jax.model.layers import project
from emo_jax.moe import route_tokens

SHAPES = {  # batch, seq, d_model, heads, experts, top_k, expert hidden (issue 16)
    "S1": (16, 256, 128, 4, 32, 4, 64),
    "S2": (8, 512, 256, 8, 64, 8, 128),
}
VOCAB = 8192


def median_ms(fn: Callable, *args, repeats: int) -> float:
    """Median ms of `repeats` calls of jit(fn), after two untimed ones (compile, warm-up)."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    return time_call(fn, args, repeats, cap_s=float("inf"), guard=False)["seconds"] * 1e3


def grad_of_all(fn: Callable, n: int) -> Callable:
    """jit-able grad of sum(fn(*args[:n]) * args[n]) in the first n arguments."""
    return lambda *args: jax.grad(lambda *a: jnp.sum(fn(*a) * args[n]), argnums=tuple(range(n)))(*args[:n])


def normal(key_index: int, shape, scale: float = 1.0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(key_index), shape, jnp.float32) * scale


def table(title: str, header: tuple, rows: list) -> None:
    print(f"\n{title}")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row))


def projection(repeats: int) -> None:
    cases = [(16, 256, 128, 8192), (8, 512, 256, 8192), (8, 512, 256, 1024), (16, 256, 128, 512), (16, 256, 128, 128)]
    rows = []
    for b, s, d, e in cases:
        x, w = normal(0, (b, s, d)), normal(1, (d, e), 0.02)
        cot = normal(2, (b, s, e))
        batched = median_ms(grad_of_all(lambda x, w: jnp.einsum("bsd,de->bse", x, w), 2), x, w, cot, repeats=repeats)
        flat = median_ms(grad_of_all(project, 2), x, w, cot, repeats=repeats)
        rows.append((f"[{b}, {s}, {d}] x [{d}, {e}]", batched, flat, f"{batched / flat:.2f}x"))
    table("projection: jit(grad) in x and w, ms", ("x x w", "batched einsum", "project (2-D)", "einsum / project"),
          rows)


def combine(repeats: int) -> None:
    rows = []
    for shape in ("S1", "S2"):
        b, s, d, _, _, k, _ = SHAPES[shape]
        t, m = b * s, b * s * k
        order = jnp.asarray(np.random.default_rng(0).permutation(m), jnp.int32)
        y_sorted, gates, valid = normal(0, (m, d)), jax.random.uniform(jax.random.PRNGKey(1), (t, k)), jnp.ones(m, bool)

        def scatter_combine(y_sorted, order, valid, gates):
            y = jnp.zeros_like(y_sorted).at[order].set(jnp.where(valid[:, None], y_sorted, 0), unique_indices=True)
            return jnp.einsum("tkd,tk->td", y.reshape(t, k, d), gates)

        args = (y_sorted, order, valid, gates)
        rows.append((shape, median_ms(scatter_combine, *args, repeats=repeats),
                     median_ms(reference.combine, *args, repeats=repeats)))
    table("combine (unsort + gate sum), forward, ms per layer", ("shape", "scatter", "reference.combine (gathers)"),
          rows)


def moe(repeats: int) -> None:
    rows = []
    for shape in ("S1", "S2"):
        b, s, d, _, e, k, h = SHAPES[shape]
        t = b * s
        x = normal(0, (b, s, d))
        seg = jnp.asarray(np.repeat(np.arange(1, s // 64 + 1), 64)[None].repeat(b, 0), jnp.int32)
        w_router, w_gate = normal(1, (d, e), 0.02), normal(2, (e, d, h), 0.02)
        w_up, w_down = normal(3, (e, d, h), 0.02), normal(4, (e, h, d), 0.02)
        ids, gates, _, _ = route_tokens(x, seg, None, w_router, k, 0)
        tokens, ids, gates, valid = x.reshape(t, d), ids.reshape(t, k), gates.reshape(t, k), (seg > 0).reshape(-1)
        sent = reference.dispatch(tokens, ids, valid, e)
        cot_rows, cot_tokens = normal(5, sent.x_sorted.shape), normal(6, (t, d))

        def route(x, w_router):
            return route_tokens(x, seg, None, w_router, k, 0)[1]

        def layer(tokens, gates, w_gate, w_up, w_down, ids, valid):
            return capacity.moe_ffn_capacity(tokens, ids, gates, valid, w_gate, w_up, w_down)

        def swiglu(rows, w_gate, w_up, w_down, sizes):
            return capacity.grouped_swiglu_capacity(rows, w_gate, w_up, w_down, sizes)

        def dense(rows, w_gate, w_up, w_down):  # the same FLOPs, one expert's weights for every row
            return (jax.nn.silu(rows @ w_gate) * (rows @ w_up)) @ w_down

        layer_args = (tokens, gates, w_gate, w_up, w_down, ids, valid)
        dense_args = (sent.x_sorted, w_gate[0], w_up[0], w_down[0])
        pieces = [
            ("routing", route, (x, w_router), lambda: median_ms(
                lambda x, w, c: jax.grad(lambda x, w: jnp.sum(route(x, w) * c), argnums=(0, 1))(x, w),
                x, w_router, normal(7, gates.reshape(b, s, k).shape), repeats=repeats)),
            ("experts: capacity layer (sort, slab, overflow, combine)", layer, layer_args, lambda: median_ms(
                lambda *a: grad_of_all(lambda *v: layer(*v, a[5], a[6]), 5)(*a[:5], a[7]),
                *layer_args, cot_tokens, repeats=repeats)),
            ("  its SwiGLU alone, on expert-sorted rows", swiglu,
             (sent.x_sorted, w_gate, w_up, w_down, sent.group_sizes),
             lambda: median_ms(lambda *a: grad_of_all(lambda *w: swiglu(*w, a[4]), 4)(*a[:4], a[5]),
                               sent.x_sorted, w_gate, w_up, w_down, sent.group_sizes, cot_rows, repeats=repeats)),
            ("dense SwiGLU, same FLOPs", dense, dense_args,
             lambda: median_ms(grad_of_all(dense, 4), *dense_args, cot_rows, repeats=repeats)),
        ]
        for name, fn, args, fwd_bwd in pieces:
            rows.append((shape, name, median_ms(fn, *args, repeats=repeats), fwd_bwd()))
    table("MoE layer pieces (standard routing, 64-token documents), ms per layer",
          ("shape", "piece", "forward", "jit(grad) (with the forward it needs)"), rows)


def sort(repeats: int) -> None:
    rows = []
    for shape in ("S1", "S2"):
        b, s, _, _, e, k, _ = SHAPES[shape]
        m = b * s * k
        keys = jnp.asarray(np.random.default_rng(0).integers(0, e + 1, m), jnp.int32)
        rows.append((shape, m, median_ms(lambda k: jnp.argsort(k, stable=True), keys, repeats=repeats),
                     median_ms(lambda k: reference.stable_order_of_small_keys(k, e + 1), keys, repeats=repeats)))
    table("sort of the token copies by expert, ms per layer", ("shape", "copies", "argsort (stable)", "packed sort"),
          rows)


def overflow(repeats: int) -> None:
    """8192 rows through the overflow loop's block SwiGLU in blocks of R rows (expert
    weights sliced per block), against the slab's batched einsum over the same rows."""
    _, _, d, _, e, _, h = SHAPES["S2"]
    rows_total = 8192
    x, dy = normal(0, (rows_total, d)), normal(1, (rows_total, d))
    w = (normal(2, (e, d, h), 0.02), normal(3, (e, d, h), 0.02), normal(4, (e, h, d), 0.02))
    flops = 2 * rows_total * d * h * 3
    rows = []
    for block in (32, 64, 128, 256, 512):
        n = rows_total // block

        def fwd(x, wg, wu, wd, block=block, n=n):
            def body(j, y):
                e_ = (j * 7) % e
                y_blk = capacity.block_swiglu(jax.lax.dynamic_slice_in_dim(x, j * block, block), wg[e_], wu[e_], wd[e_])
                return jax.lax.dynamic_update_slice_in_dim(y, y_blk, j * block, 0)
            return jax.lax.fori_loop(0, n, body, jnp.zeros((rows_total, d)))

        def bwd(x, dy, wg, wu, wd, block=block, n=n):
            def body(j, carry):
                dx, dws = carry
                e_ = (j * 7) % e
                _, dx_blk, dws_e = capacity.block_swiglu_grads(
                    jax.lax.dynamic_slice_in_dim(x, j * block, block), jax.lax.dynamic_slice_in_dim(dy, j * block, block),
                    wg[e_], wu[e_], wd[e_])
                return (jax.lax.dynamic_update_slice_in_dim(dx, dx_blk, j * block, 0),
                        tuple(capacity.add_at(a, e_, g) for a, g in zip(dws, dws_e)))
            return jax.lax.fori_loop(0, n, body, (jnp.zeros((rows_total, d)), tuple(jnp.zeros_like(v) for v in (wg, wu, wd))))

        f, g = median_ms(fwd, x, *w, repeats=repeats), median_ms(bwd, x, dy, *w, repeats=repeats)
        rows.append((f"loop, R = {block}", n, f, flops / f / 1e6, g))
    slab = lambda x, wg, wu, wd: capacity.slab_swiglu(x.reshape(16, -1, d), wg[:16], wu[:16], wd[:16])[0]  # noqa: E731
    f = median_ms(slab, x, *w, repeats=repeats)
    rows.append(("slab [16, 512, D]", 1, f, flops / f / 1e6, "-"))
    table(f"overflow blocks: {rows_total} rows, S2 experts (D {d}, H {h}), ms",
          ("formulation", "blocks", "forward", "forward GFLOP/s", "backward (recomputing)"), rows)


def attention(repeats: int) -> None:
    rows = []
    long = (1, 2048, 1024, 16)  # batch, seq, width, heads: a longer row, one document
    for shape, (b, s, d, heads) in [(name, SHAPES[name][:4]) for name in ("S1", "S2")] + [("S 2048", long)]:
        q, k, v, cot = (normal(i, (b, s, heads, d // heads)) for i in range(4))
        documents = [("one per row", jnp.ones((b, s), jnp.int32))]
        if shape != "S 2048":
            documents.append(("64 tokens", jnp.asarray(np.repeat(np.arange(1, s // 64 + 1), 64)[None].repeat(b, 0),
                                                       jnp.int32)))
        for docs, seg in documents:
            paths = [("default", None)] + ([("loops", 0)] if shape != "S 2048" else [])
            for tile, (path, unroll) in itertools.product((128, 64), paths):
                fn = functools.partial(blocked_attention, block_q=tile, block_k=tile, unroll_blocks=unroll)
                rows.append((shape, docs, tile, path, median_ms(fn, q, k, v, seg, repeats=repeats),
                             median_ms(lambda q, k, v, seg, c, fn=fn: grad_of_all(
                                 lambda q, k, v: fn(q, k, v, seg), 3)(q, k, v, c), q, k, v, seg, cot,
                                 repeats=repeats)))
    table("blocked attention, ms per layer (default: the unrolled path when it is chosen, docs/attention.md)",
          ("shape", "documents", "tile", "path", "forward", "forward+backward"), rows)


def torch_pieces(repeats: int) -> None:
    try:
        import torch
        import torch.nn.functional as F
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError as exc:
        print(f"\ntorch: skipped ({exc})")
        return

    def ms(fn) -> float:
        with torch.no_grad():
            fn(), fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    torch.manual_seed(0)
    b, s, d, heads, e, k, h = SHAPES["S2"]
    q, kk, v = (torch.randn(b, heads, s, d // heads) for _ in range(3))
    block = OlmoeSparseMoeBlock(OlmoeConfig(hidden_size=d, intermediate_size=h, num_experts=e,
                                            num_experts_per_tok=k, norm_topk_prob=False))
    x = torch.randn(b, s, d)
    hidden, head = torch.randn(b * s, d), torch.randn(d, VOCAB)
    table(f"torch {torch.__version__} ({torch.get_num_threads()} threads), S2, forward, ms per layer",
          ("piece", "forward"),
          [("causal SDPA, one document per row", ms(lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=True))),
           ("OlmoeSparseMoeBlock", ms(lambda: block(x))),
           (f"LM head x @ W, [{b * s}, {d}] x [{d}, {VOCAB}]", ms(lambda: hidden @ head)),
           ("the same LM head in jax (for comparison)",
            median_ms(jnp.matmul, normal(0, (b * s, d)), normal(1, (d, VOCAB)), repeats=repeats))])


SECTIONS = {"projection": projection, "combine": combine, "moe": moe, "sort": sort, "overflow": overflow,
            "attention": attention, "torch": torch_pieces}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}, {jax.device_count()} device(s)")
    for name in args.sections:
        SECTIONS[name](args.repeats)


if __name__ == "__main__":
    main()
