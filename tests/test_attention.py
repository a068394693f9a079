"""Attention kernels (emo_jax.kernels.attention) against the reference (the S x S mask and
jax.nn.dot_product_attention): forward and gradients on packed rows with several
documents and padding, block skipping, linear memory, the config key and the model."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_config  # noqa: E402

from emo_jax.config import ConfigError  # noqa: E402
from emo_jax.kernels import attention as attn  # noqa: E402
from emo_jax.kernels import attention_blocked  # noqa: E402
from emo_jax.kernels.attention_blocked import blocked_attention, first_occurrence, key_block_starts  # noqa: E402
from emo_jax.model import build_model  # noqa: E402

ATOL = 2e-6  # float32, "highest" matmul precision (conftest)
GRAD_ATOL = 2e-5


def packed_segments(seq: int) -> np.ndarray:
    """i32[4, seq]: the layouts packed rows take, plus one the packer never makes.

    row 0: one document filling the row; row 1: three documents then padding;
    row 2: a one-token document between two others, padding at the end;
    row 3: non-contiguous ids (1 1 2 2 1 1 ...) and padding in the middle.
    """
    seg = np.zeros((4, seq), np.int32)
    seg[0] = 1
    a, b = seq // 4, seq // 2
    seg[1, :a], seg[1, a:b], seg[1, b:seq - 5] = 1, 2, 3
    seg[2, :a], seg[2, a], seg[2, a + 1:seq - 3] = 1, 2, 3
    seg[3] = np.where((np.arange(seq) // 6) % 2 == 0, 1, 2)
    seg[3, b:b + 4] = 0
    return seg


def qkv(seed: int, batch: int, seq: int, heads: int = 2, dim: int = 8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32) for _ in range(3))


def loss_grads(fn, q, k, v, seg):
    """Gradients of a weighted sum (a fixed random cotangent) with respect to q, k, v."""
    weight = jnp.asarray(np.random.default_rng(99).normal(size=q.shape), jnp.float32)
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * weight), argnums=(0, 1, 2))(q, k, v)


def assert_matches_reference(fn, q, k, v, seg, atol=ATOL, grad_atol=GRAD_ATOL):
    seg = jnp.asarray(seg)
    expected = attn.reference_attention(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v, seg)), np.asarray(expected), atol=atol, rtol=0)
    for got, want in zip(jax.jit(lambda *a: loss_grads(fn, *a))(q, k, v, seg),
                         loss_grads(attn.reference_attention, q, k, v, seg)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=grad_atol, rtol=0)


# ------------------------------------------------------------------- blocked (pure JAX)


def force_path(monkeypatch, path: str) -> int:
    """unroll_blocks for `path`: "loops" (never unrolled), "unrolled" (always, whatever
    the documents), "auto" (the default cap and run-time choice)."""
    if path == "unrolled":
        monkeypatch.setattr(attention_blocked, "UNROLL_MIN_VISITED", 0.0)
        return 1 << 20
    return 0 if path == "loops" else None


@pytest.mark.parametrize("path", ["loops", "unrolled", "auto"])
@pytest.mark.parametrize("seq,block_q,block_k", [(37, 8, 8), (37, 16, 8), (37, 8, 16), (40, 5, 7),
                                                 (30, 64, 64)])
def test_blocked_matches_reference(seq, block_q, block_k, path, monkeypatch):
    """Forward and q/k/v gradients equal the reference on packed rows with several
    documents and padding, S not a multiple of the blocks (and one block larger than S),
    by the loops, by the unrolled path, and by the run-time choice between them."""
    seg = packed_segments(seq)
    q, k, v = qkv(seq + block_q, seg.shape[0], seq)
    unroll = force_path(monkeypatch, path)
    fn = lambda q, k, v, s: blocked_attention(q, k, v, s, block_q, block_k, unroll)  # noqa: E731
    assert_matches_reference(fn, q, k, v, seg)


def test_unrolled_path_chosen_for_long_documents_only():
    """The run-time choice: one document per row visits every causal tile (unrolled);
    64-token documents at S = 512 visit the diagonal only (4 of 10 tiles: loops)."""
    tiles = attention_blocked._Tiles(512, 128, 128)
    one_doc = jnp.ones((2, 512), jnp.int32)
    short_docs = jnp.asarray(np.repeat(np.arange(1, 9), 64)[None].repeat(2, 0), jnp.int32)
    for seg, expected in ((one_doc, True), (short_docs, False)):
        _, lo = attention_blocked._segments(seg, tiles)
        assert bool(attention_blocked._use_unrolled(lo, tiles)) is expected


def test_blocked_bfloat16_close_to_reference():
    seg = packed_segments(48)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(1, 4, 48))
    out = jax.jit(lambda *a: blocked_attention(*a, 16, 16))(q, k, v, jnp.asarray(seg))
    assert out.dtype == jnp.bfloat16
    expected = attn.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=3e-2, rtol=0)


def test_first_occurrence_and_block_starts_match_brute_force():
    seg = packed_segments(37)
    first = np.asarray(first_occurrence(jnp.asarray(seg)))
    for b in range(seg.shape[0]):
        for t in range(seg.shape[1]):
            assert first[b, t] == int(np.argmax(seg[b] == seg[b, t])), (b, t)
    padded = np.concatenate([seg, np.full((4, 3), -1, np.int32)], axis=1)  # 40 = 5 blocks of 8
    lo = np.asarray(key_block_starts(jnp.asarray(padded), 8, 4))
    first = np.asarray(first_occurrence(jnp.asarray(padded)))
    np.testing.assert_array_equal(lo, first.reshape(4, 5, 8).min(axis=(0, 2)) // 4)


def two_documents():
    """Two rows of S = 64, each documents [0, 32) and [32, 64), with q, k, v [2, 64, 2, 8]."""
    seg = np.ones((2, 64), np.int32)
    seg[:, 32:] = 2
    return seg, *qkv(3, 2, 64)


@pytest.mark.parametrize("unroll", [0, None])
def test_blocked_skips_blocks_above_diagonal_and_before_documents(unroll):
    """The loops never read keys and values in blocks that no query of a block can see:
    NaN there (which a visited-but-masked tile would spread through p @ v) leaves the
    output and the gradients finite and equal to the reference on clean inputs. With
    unroll=None (the default cap; 4 query blocks of 16 here) the run-time choice takes
    the loops: two 32-token documents per row visit 6 of the 10 causal tiles."""
    block = 16
    seg, q, k, v = two_documents()
    # Query block 3 (rows 48..63, document 2) must skip key blocks 0 and 1 (document 1).
    poisoned_k = k.at[:, :32].set(jnp.nan)
    poisoned_v = v.at[:, :32].set(jnp.nan)
    extra = () if unroll is None else (unroll,)
    fn = jax.jit(lambda q, k, v: blocked_attention(q, k, v, jnp.asarray(seg), block, block, *extra))
    out = np.asarray(fn(q, poisoned_k, poisoned_v))
    expected = np.asarray(attn.reference_attention(q, k, v, jnp.asarray(seg)))
    np.testing.assert_allclose(out[:, 32:], expected[:, 32:], atol=ATOL, rtol=0)
    # Above the diagonal: NaN in the last key block changes no query before it.
    late = fn(q, k.at[:, 48:].set(jnp.nan), v.at[:, 48:].set(jnp.nan))
    np.testing.assert_allclose(np.asarray(late)[:, :48], expected[:, :48], atol=ATOL, rtol=0)
    grads = jax.grad(lambda k, v: jnp.sum(fn(q, k, v)[:, 32:]), argnums=(0, 1))(poisoned_k, poisoned_v)
    assert all(np.isfinite(np.asarray(g[:, 32:])).all() for g in grads)


def test_unrolled_path_runs_in_both_passes_when_chosen(monkeypatch):
    """Which branch runs, seen through NaN in the first document's keys: the unrolled
    path reads the whole key prefix (masked), so NaN there reaches the second
    document's outputs and its query gradients; the loops (the previous test) skip it.
    A forward or a backward that fell back to the loops would stay finite here."""
    monkeypatch.setattr(attention_blocked, "UNROLL_MIN_VISITED", 0.0)  # always unrolled when eligible
    block = 16
    seg, q, k, v = two_documents()
    poisoned_k = k.at[:, :32].set(jnp.nan)
    fn = jax.jit(lambda q, k: blocked_attention(q, k, v, jnp.asarray(seg), block, block))
    assert not np.isfinite(np.asarray(fn(q, poisoned_k))[:, 32:]).all()
    # The backward, given the clean forward's output and log-sum-exp: only the unrolled
    # backward recomputes scores against the poisoned keys.
    tiles = attention_blocked._Tiles(q.shape[1], block, block)
    qs, kh, vh, _ = attention_blocked._heads(q, k, v, tiles)
    padded_seg, lo = attention_blocked._segments(jnp.asarray(seg), tiles)
    unroll = None  # the default cap
    out, lse = attention_blocked._attend(qs, kh, vh, padded_seg, lo, tiles, unroll)

    def second_document_dq():  # from keys with NaN in the first document
        dq, _, _ = attention_blocked._attend_grads(qs, kh.at[:, :, :32].set(jnp.nan), vh, padded_seg, lo, out, lse,
                                                   jnp.ones_like(out), tiles, unroll)
        return np.asarray(dq)[:, :, 32:]

    assert not np.isfinite(second_document_dq()).all()
    monkeypatch.setattr(attention_blocked, "UNROLL_MIN_VISITED", 0.8)  # the default: loops for this layout
    assert np.isfinite(second_document_dq()).all()


def test_default_choice_on_packed_documents_matches_reference():
    """Every row packed with short documents and S within the cap: the run-time choice
    takes the loops branch of the cond (the other tests' layouts take the unrolled one),
    and its forward and gradients equal the reference."""
    seq = 64
    seg = np.repeat(np.arange(1, 9), 8)[None].repeat(3, 0).astype(np.int32)  # eight 8-token documents
    seg[1, -3:] = 0  # padding
    seg[2] = np.repeat(np.arange(1, 5), 16)  # lo = [0, 1, 2, 3]: 4 of the 10 causal tiles
    tiles = attention_blocked._Tiles(seq, 16, 16)
    _, lo = attention_blocked._segments(jnp.asarray(seg), tiles)
    assert not bool(attention_blocked._use_unrolled(lo, tiles))
    q, k, v = qkv(11, 3, seq)
    fn = lambda q, k, v, s: blocked_attention(q, k, v, s, 16, 16)  # noqa: E731
    assert_matches_reference(fn, q, k, v, seg)


def _temp_bytes(seq: int, kernel) -> int:
    q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(kernel(q, k, v, s)), argnums=(0, 1, 2)))
    return grad.lower(q, q, q, seg).compile().memory_analysis().temp_size_in_bytes


def test_blocked_memory_linear_in_sequence():
    """Compiled scratch memory of forward+backward grows ~4x from S=512 to 2048 for the
    loops (linear), ~16x for the reference (its [B, H, S, S] scores); with the default
    tiles and unrolled path (quadratic only up to 512 tokens) too from S=2048 to 8192."""
    loops = lambda q, k, v, s: blocked_attention(q, k, v, s, 128, 128, 0)  # noqa: E731
    default = lambda q, k, v, s: blocked_attention(q, k, v, s)  # noqa: E731
    blocked = _temp_bytes(2048, loops) / _temp_bytes(512, loops)
    reference = _temp_bytes(2048, attn.reference_attention) / _temp_bytes(512, attn.reference_attention)
    assert blocked < 6, blocked
    assert reference > 8, reference
    assert _temp_bytes(8192, default) / _temp_bytes(2048, default) < 6


# ------------------------------------------------------------- Pallas kernels (interpret)


def _interpret_or_skip(kernel_name: str, block: int):
    from emo_jax.kernels import attention_pallas
    try:
        fn = getattr(attention_pallas, kernel_name)
        q, k, v = qkv(0, 1, 8)
        jax.block_until_ready(fn(q, k, v, jnp.ones((1, 8), jnp.int32), block=block, interpret=True))
    except (ImportError, NotImplementedError) as err:  # pragma: no cover - depends on the jax build
        pytest.skip(f"this jax ({jax.__version__}) cannot run {kernel_name} in interpret mode: {err}")
    return fn


def test_splash_attention_interpret_matches_reference():
    """TPU splash attention (segment ids, static causal mask) in Pallas's interpreter:
    S=200 padded to two blocks of 128."""
    fn = _interpret_or_skip("splash_attention", 128)
    seg = packed_segments(200)[1:3]
    q, k, v = qkv(5, 2, 200, dim=32)
    assert_matches_reference(lambda q, k, v, s: fn(q, k, v, s, block=128, interpret=True), q, k, v, seg,
                             atol=5e-6, grad_atol=5e-5)
    with pytest.raises(ValueError, match="multiple of 128"):
        fn(q, k, v, jnp.asarray(seg), block=64, interpret=True)


@pytest.mark.parametrize("block", [16, 64])
def test_gpu_flash_attention_interpret_matches_reference(block):
    """GPU (Triton) flash attention with segment ids in Pallas's interpreter, S=72."""
    fn = _interpret_or_skip("gpu_flash_attention", block)
    seg = packed_segments(72)
    q, k, v = qkv(6, 4, 72, dim=16)
    assert_matches_reference(lambda q, k, v, s: fn(q, k, v, s, block=block, interpret=True), q, k, v, seg,
                             atol=5e-6, grad_atol=5e-5)


# ------------------------------------------------------------------ config and the model


def test_resolve_attention_per_platform_and_errors():
    assert attn.resolve_attention("auto", "cpu") == "blocked"
    assert attn.resolve_attention("auto", "tpu") == "splash"
    assert attn.resolve_attention("auto", "gpu") == "flash_gpu"
    assert attn.resolve_attention("reference", "tpu") == "reference"
    with pytest.raises(ValueError, match="kernels.attention") as err:
        attn.resolve_attention("flash", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="runs on tpu only"):
        attn.resolve_attention("splash", "cpu")
    with pytest.raises(ValueError, match="kernels.attention_block"):
        attn.attention_for("blocked", -1)


def test_attention_block_zero_takes_each_kernels_default():
    """kernels.attention_block=0 (the config default): blocked picks its tile from the
    sequence length (64 rows up to 512 tokens, 128 beyond), splash and flash_gpu take 128;
    an explicit size is passed through."""
    assert tiny_config().kernels.attention_block == 0
    assert attn.attention_for("blocked", 0, "cpu").keywords == {"block_q": None, "block_k": None}
    assert attn.attention_for("blocked", 128, "cpu").keywords == {"block_q": 128, "block_k": 128}
    assert [attention_blocked.default_block(s) for s in (1, 256, 512, 513, 4096)] == [64, 64, 64, 128, 128]
    tiles = attention_blocked._Tiles(512, None, None)
    assert (tiles.block_q, tiles.block_k, tiles.n_q) == (64, 64, 8)
    assert attn.attention_for("splash", 0, "tpu").keywords == {"block": 128}
    assert attn.attention_for("flash_gpu", 0, "gpu").keywords == {"block": 128}
    assert attn.attention_for("reference", 0, "cpu") is attn.reference_attention


def test_default_unroll_cap_is_a_sequence_length():
    """Unrolled up to a padded length of UNROLL_MAX_SEQ whatever the tile (8 tiles of 64 or
    4 of 128 at S = 512), never beyond; an explicit unroll_blocks counts query blocks."""
    eligible = attention_blocked._unroll_eligible
    cap = attention_blocked.UNROLL_MAX_SEQ
    assert eligible(attention_blocked._Tiles(cap, 64, 64), None)
    assert eligible(attention_blocked._Tiles(cap, 128, 128), None)
    assert not eligible(attention_blocked._Tiles(cap + 1, 64, 64), None)
    assert not eligible(attention_blocked._Tiles(cap, 64, 64), 4)
    assert eligible(attention_blocked._Tiles(cap, 128, 128), 4)
    # Tiny tiles: at most UNROLL_MAX_BLOCKS unrolled blocks (each one adds to the program).
    assert eligible(attention_blocked._Tiles(128, 16, 16), None)
    assert not eligible(attention_blocked._Tiles(cap, 16, 16), None)


@pytest.mark.parametrize("path", ["loops", "unrolled"])
@pytest.mark.parametrize("mesh_shape", [(2, 4), (4, 2)])
def test_blocked_gradients_keep_a_head_sharding(path, mesh_shape, monkeypatch):
    """Batch over `data` and heads over `tensor` (the model's logical rules): outputs and
    gradients equal the unsharded ones and keep that sharding (the backward's dq transpose
    must not merge the batch and head axes, which made XLA gather every tile)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    unroll = force_path(monkeypatch, path)
    seg = jnp.asarray(np.repeat(np.array([[1] * 40 + [2] * 24]), 4, axis=0), jnp.int32)  # [4, 64]
    q, k, v = qkv(5, 4, 64, heads=4)
    cot = jax.random.normal(jax.random.PRNGKey(7), q.shape)
    fn = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(blocked_attention(q, k, v, seg, 16, 16, unroll) * cot),
                                    argnums=(0, 1, 2)))
    want = fn(q, k, v)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("data", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
    got = fn(*(jax.device_put(x, sharding) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-6, rtol=0)
        assert g.sharding.is_equivalent_to(sharding, g.ndim), g.sharding


def test_config_key_validated():
    assert tiny_config("kernels.attention=blocked").kernels.attention == "blocked"
    assert tiny_config().kernels.attention == "auto"
    with pytest.raises(ConfigError, match="kernels.attention") as err:
        tiny_config("kernels.attention=flash")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="kernels.attention_block"):
        tiny_config("kernels.attention_block=-1")


def test_model_blocked_attention_equals_reference():
    """The decoder with kernels.attention=blocked (tiles of 8, S=24) gives the logits and
    parameter gradients of the reference kernel on packed rows with padding."""
    base = ("data.seq_len=24", "model.max_seq_len=32", "model.n_layers=1", "kernels.attention_block=8",
            "routing.pool=fixed")
    models = [build_model(tiny_config(*base, f"kernels.attention={name}")) for name in ("reference", "blocked")]
    seg = np.zeros((2, 24), np.int32)
    seg[0, :10], seg[0, 10:20] = 1, 2
    seg[1, :7], seg[1, 7:] = 1, 2
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 500, (2, 24)), jnp.int32)
    seg = jnp.asarray(seg)
    params = models[0].init({"params": jax.random.PRNGKey(0), "routing": jax.random.PRNGKey(1)}, tokens, seg)["params"]

    def loss(model, params):
        logits, _ = model.apply({"params": params}, tokens, seg, train=True, rngs={"routing": jax.random.PRNGKey(2)})
        return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits

    (_, ref_logits), ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(models[0], p), has_aux=True))(params)
    (_, logits), grads = jax.jit(jax.value_and_grad(lambda p: loss(models[1], p), has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=1e-4)
