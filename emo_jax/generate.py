"""Autoregressive decoding with a KV cache: greedy, temperature and top-p sampling.

Works for full and pruned models alike (the cache depends on attention shapes only).
One `jit`-compiled function runs the prefill of the (right-padded) prompts through the
model's attention kernel (no [B, 1, S, T] cache mask: with any kernel but `reference`,
memory linear in the prompt), and a `lax.scan` over the new tokens; each step feeds
one token per row through the model with the cache (emo_jax.model.kv_cache).

Routing during generation is HF-style inference: every token takes top-k_r over all
routed experts of its layer (plus the shared ones), i.e. `routing.eval_pool` is forced
to "none". A document pool (docs/algorithm.md#one-moe-layer) averages router probabilities over the
whole document, future tokens included, so it is not causal and cannot be grown one
token at a time. The EMO way to restrict a generation to a subset of experts is to
select the subset (e.g. on the prompt) and prune the model physically, then generate
with the pruned model, where the router's softmax renormalises over the kept experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import Config, KernelConfig, ModelConfig, RoutingConfig, replace
from emo_jax.model import build_model
from emo_jax.model.kv_cache import extend

Array = jax.Array


class GenerationError(ValueError):
    """Generation inputs that cannot work, with a message naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose mass reaches top_p
    eos_id: int | None = None  # stop a row after it emits this token (later tokens are pad_id)
    pad_id: int = 0
    seed: int = 0


class GenerationResult(NamedTuple):
    tokens: np.ndarray  # i32[B, N] generated tokens (pad_id after a row's EOS)
    lengths: np.ndarray  # i32[B] generated tokens per row, EOS included
    logits: np.ndarray | None  # f32[B, N, V] the logits each new token was chosen from


def inference_config(config: Config) -> Config:
    """The config used for decoding: no document pool, no rematerialisation. Routing
    fields that only matter in training are reset, so that models that differ only in
    them share one compiled decoder."""
    r = config.routing
    routing = dataclasses.asdict(RoutingConfig(pool="none", eval_pool="none", segments=r.segments, eos_id=r.eos_id))
    return replace(config, routing=routing, model={"remat": "none"})


def check_prompts(prompts: Sequence[Sequence[int]], max_seq_len: int, max_new_tokens: int,
                  vocab_size: int) -> None:
    """Fails with one line for empty prompts, out-of-vocabulary ids or a too long context."""
    if not prompts:
        raise GenerationError("no prompt given; pass at least one prompt.")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {i} is empty; generation needs at least one token to condition on.")
        if len(prompt) > max_seq_len:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens but the model's context is "
                                  f"max_seq_len={max_seq_len}; shorten the prompt to at most {max_seq_len} tokens.")
        if len(prompt) + max_new_tokens > max_seq_len:
            raise GenerationError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens={max_new_tokens} exceeds "
                                  f"the context max_seq_len={max_seq_len}; lower max_new_tokens to at most "
                                  f"{max_seq_len - len(prompt)} or shorten the prompt.")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
                                  "use the tokenizer the model was trained with.")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded i32[B, P] tokens and i32[B] lengths."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = np.asarray(prompt, np.int32)
    return tokens, lengths


def top_p_logits(logits: Array, top_p: Array) -> Array:
    """Logits outside the nucleus set to -inf: keep the most likely tokens until their
    probability mass reaches top_p (always at least the most likely). f32[..., V].

    A token is kept iff the tokens strictly more likely than it hold less than top_p
    of the mass (tied tokens are kept or dropped together); top_p >= 1 keeps every
    token (a float32 mass can round to 1 before the tail). The cutoff is found by
    bisection over the bit patterns of the probabilities (non-negative float32 order
    as int32): 32 masked sums over the vocabulary instead of a sort, which takes
    ~22 ms for [16, 8192] on XLA:CPU against ~0.8 ms (BUILD_NOTES.md)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # >= 0, ordered as probs

    def mass_above(b: Array) -> Array:  # i32[...] -> f32[...]: mass of tokens whose bits exceed b
        return jnp.sum(jnp.where(bits > b[..., None], probs, 0.0), axis=-1)

    # Smallest b with mass_above(b) < top_p: mass_above(hi) < top_p always (hi = max
    # bits: nothing above), and it is non-increasing in b.
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below = mass_above(mid) < top_p
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    hi = jnp.max(bits, axis=-1)
    cut, _ = jax.lax.fori_loop(0, 32, halve, (jnp.zeros_like(hi), hi))
    return jnp.where((bits >= cut[..., None]) | (top_p >= 1), logits, -jnp.inf)


def sample_token(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
    """Next token per row: argmax when temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus. f32[B, V] -> i32[B].

    temperature and top_p may be traced scalars: `lax.cond` then runs only the branch
    they pick. Greedy decoding pays for an argmax only, and top_p == 1 skips the
    nucleus. Computing the draw and the nucleus (then a sort of the vocabulary) and
    discarding them cost ~14 ms of a ~15 ms decode step at issue 16's S1 shape on CPU
    (BUILD_NOTES.md)."""
    logits = logits.astype(jnp.float32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        nucleus = jax.lax.cond(top_p < 1, lambda s: top_p_logits(s, top_p), lambda s: s, scaled)
        return jax.random.categorical(key, nucleus, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, logits)


@functools.lru_cache(maxsize=8)
def _decode_fn(model_config: ModelConfig, routing_config: RoutingConfig, kernels: KernelConfig,
               max_new_tokens: int, return_logits: bool):
    """A jitted (params, tokens, lengths, key, temperature, top_p, eos_id, pad_id) -> outputs."""
    config = Config(model=model_config, routing=routing_config, kernels=kernels)
    model = build_model(config)

    def run(params, tokens, lengths, key, temperature, top_p, eos_id, pad_id):
        batch, prompt_len = tokens.shape
        index = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
        segment_ids = (index < lengths[:, None]).astype(jnp.int32)
        positions = jnp.broadcast_to(index, tokens.shape)
        # Prefill through the model's attention kernel (no cache mask); the cache it
        # returns holds the prompts, then gets the slots of the new tokens (kv_cache).
        (logits, _), state = model.apply({"params": params}, tokens, segment_ids, positions,
                                         train=False, mutable=["cache"])
        state = {"cache": extend(state["cache"], max_new_tokens)}
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

        def choose(last_logits, step_key, done):
            token = jnp.where(done, pad_id, sample_token(last_logits, step_key, temperature, top_p))
            return token, done | (token == eos_id)

        def step(carry, step_key):
            cache, last_logits, position, done = carry
            token, done = choose(last_logits, step_key, done)
            (logits, _), state = model.apply({"params": params, "cache": cache}, token[:, None],
                                             jnp.ones((batch, 1), jnp.int32), position[:, None],
                                             train=False, mutable=["cache"])
            out = (token, last_logits) if return_logits else (token,)
            return (state["cache"], logits[:, 0], position + 1, done), out

        # N - 1 steps that feed their token back, then the last token needs no forward pass.
        keys = jax.random.split(key, max_new_tokens)
        carry = (state["cache"], last, lengths, jnp.zeros((batch,), bool))
        (_, last, _, done), outs = jax.lax.scan(step, carry, keys[:-1])
        token, _ = choose(last, keys[-1], done)
        final = (token, last) if return_logits else (token,)
        return tuple(jnp.concatenate([jnp.swapaxes(o, 0, 1), f[:, None]], axis=1) for o, f in zip(outs, final))

    return jax.jit(run)


def generate(config: Config, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             return_logits: bool = False) -> GenerationResult:
    """Continues every prompt (a list of token ids) by `sampling.max_new_tokens` tokens."""
    config = inference_config(config)
    m = config.model
    check_prompts(prompts, m.max_seq_len, sampling.max_new_tokens, m.vocab_size)
    if not (sampling.temperature >= 0 and 0 < sampling.top_p <= 1):
        raise GenerationError(f"temperature={sampling.temperature} must be >= 0 and top_p={sampling.top_p} "
                              "in (0, 1].")
    tokens, lengths = pad_prompts(prompts, sampling.pad_id)
    eos = -1 if sampling.eos_id is None else sampling.eos_id
    outs = _decode_fn(config.model, config.routing, config.kernels, sampling.max_new_tokens, return_logits)(
        params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(sampling.seed),
        jnp.float32(sampling.temperature), jnp.float32(sampling.top_p), jnp.int32(eos), jnp.int32(sampling.pad_id))
    new_tokens = np.asarray(outs[0])
    is_eos = new_tokens == eos
    ended = is_eos.any(axis=1)
    gen_lengths = np.where(ended, is_eos.argmax(axis=1) + 1, new_tokens.shape[1]).astype(np.int32)
    logits = np.asarray(outs[1]) if return_logits else None
    return GenerationResult(tokens=new_tokens, lengths=gen_lengths, logits=logits)


def find_tokenizer(path: str | None, model_dir: str | None, config: Config, required: bool = True):
    """A `tokenizers.Tokenizer` from `path`, else MODEL_DIR/tokenizer.json, else config.data.tokenizer."""
    from pathlib import Path
    from tokenizers import Tokenizer
    candidates = [path] if path else [str(Path(model_dir) / "tokenizer.json") if model_dir else "",
                                      config.data.tokenizer]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            tokenizer = Tokenizer.from_file(candidate)
            if tokenizer.get_vocab_size() > config.model.vocab_size:
                raise GenerationError(f"tokenizer {candidate} has {tokenizer.get_vocab_size()} tokens but the model's "
                                      f"vocab_size is {config.model.vocab_size}; pass the model's own tokenizer.")
            return tokenizer
    if path:
        raise GenerationError(f"tokenizer file {path} does not exist; pass the model's tokenizer.json.")
    if required:
        raise GenerationError("no tokenizer.json found (not in the model directory nor data.tokenizer); pass "
                              "--tokenizer PATH, or give prompts as token ids with --prompt-ids.")
    return None


def tokenizer_eos(tokenizer) -> int | None:
    """The id of the end-of-text token of `tokenizer`, if it has one."""
    if tokenizer is None:
        return None
    for token in ("<|endoftext|>", "</s>", "<eos>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
