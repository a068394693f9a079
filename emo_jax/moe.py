"""One EMO MoE layer as a pure function: route -> dispatch -> experts -> combine.

`moe_layer` is the single-device reference. Expert-parallel versions
(`emo_jax.parallel.expert_parallel`) have the same signature, so the Linen block
takes either.
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import chex
import jax
import jax.numpy as jnp

from emo_jax import routing
from emo_jax import kernels
from emo_jax.kernels import reference
from emo_jax.kernels.gathered import moe_ffn_gathered, use_gathered

Array = jax.Array


class MoELayerFn(Protocol):
    def __call__(self, x: Array, segment_ids: Array, pool_sizes: Array | None, w_router: Array,
                 w_gate: Array, w_up: Array, w_down: Array, *, routed_top_k: int,
                 n_shared: int, w_shared_router: Array | None = None) -> tuple[Array, routing.RoutingStats]: ...


def router_logits(x: Array, w_router: Array) -> Array:
    """z = W_r h in float32. x: [..., D]; w_router: f32[D, N] -> f32[..., N]."""
    return jnp.einsum("...d,dn->...n", x.astype(jnp.float32), w_router.astype(jnp.float32))


def shared_gates(x: Array, w_shared_router: Array | None, n_shared: int) -> Array | None:
    """Weights f32[..., n_s] of the shared experts, or None (weight exactly 1.0).

    As the official EMO model: with n_s >= 2 a softmax over the shared router's own
    logits (independent of the routed experts' softmax); with n_s <= 1 no router.
    """
    if n_shared < 2:
        if w_shared_router is not None:
            raise ValueError(f"a shared-expert router is only used with 2 or more shared experts, got n_shared={n_shared}.")
        return None
    if w_shared_router is None:
        raise ValueError(f"{n_shared} shared experts need their router w_shared_router f32[D, {n_shared}].")
    chex.assert_shape(w_shared_router, (x.shape[-1], n_shared))
    return jax.nn.softmax(router_logits(x, w_shared_router), axis=-1)


def route_tokens(x: Array, segment_ids: Array, pool_sizes: Array | None, w_router: Array,
                 routed_top_k: int, n_shared: int,
                 w_shared_router: Array | None = None) -> tuple[Array, Array, Array | None, routing.RoutingStats]:
    """Routing of one layer: the routed experts of every token, and the shared experts' weights.

    x: [B, S, D]; segment_ids: i32[B, S]; pool_sizes: i32[B, G] or None;
    w_router: f32[D, N]; w_shared_router: f32[D, n_s] when n_s >= 2, else None.
    Returns routed expert ids i32[B, S, k_r], their gates f32[B, S, k_r], the shared
    experts' weights f32[B, S, n_s] (None: weight exactly 1, n_s <= 1), stats.
    """
    chex.assert_rank(x, 3)
    chex.assert_shape(segment_ids, x.shape[:2])
    chex.assert_type(segment_ids, int)
    chex.assert_shape(w_router, (x.shape[-1], None))
    r = routing.route(router_logits(x, w_router), segment_ids, routed_top_k, pool_sizes,
                      num_segments=segment_ids.shape[1] + 1)
    return r.expert_ids, r.gates, shared_gates(x, w_shared_router, n_shared), r.stats


def shared_experts_ffn(x: Array, valid: Array, w_gate: Array, w_up: Array, w_down: Array,
                       gates: Array | None) -> Array:
    """The shared experts as a dense SwiGLU over every token: no dispatch, no exchange.

    x: [T, D]; valid: bool[T]; w_gate, w_up: [n_s, D, H]; w_down: [n_s, H, D];
    gates: f32[T, n_s] or None (one shared expert, weight 1). Returns [T, D]
    (sum_j gates[t, j] * E_j(x_t)); padding tokens give 0 (`where`, so nothing in
    them can leak: the inputs of padding tokens are zeroed too, or a NaN there would
    reach the weight gradients through x^T dy).
    """
    n_shared = w_gate.shape[0]
    x = jnp.where(valid[:, None], x, 0)
    if n_shared == 1 and gates is None:
        y = (jax.nn.silu(x @ w_gate[0]) * (x @ w_up[0])) @ w_down[0]
    else:
        h = jax.nn.silu(jnp.einsum("td,sdh->tsh", x, w_gate)) * jnp.einsum("td,sdh->tsh", x, w_up)
        y = jnp.einsum("tsh,shd->tsd", h, w_down).astype(jnp.float32)
        y = jnp.einsum("tsd,ts->td", y, gates.astype(jnp.float32)).astype(x.dtype)
    return jnp.where(valid[:, None], y, 0)


def moe_layer(x: Array, segment_ids: Array, pool_sizes: Array | None, w_router: Array,
              w_gate: Array, w_up: Array, w_down: Array, *, routed_top_k: int, n_shared: int,
              w_shared_router: Array | None = None,
              ffn: Callable[..., Array] = reference.moe_ffn) -> tuple[Array, routing.RoutingStats]:
    """EMO MoE feed-forward on one device.

    x: [B, S, D]; segment_ids: i32[B, S] (0 = padding); pool_sizes: i32[B, S + 1] or
    None (standard MoE); w_router: f32[D, N]; w_gate, w_up: [E, D, H]; w_down: [E, H, D]
    with experts N..E-1 shared; w_shared_router: f32[D, n_s] for n_s >= 2 (their softmax
    weights), else None (weight 1). Returns (y [B, S, D], stats summed over these tokens).
    The routed experts go through `ffn` (dispatch, grouped SwiGLU, combine), or, when
    the call has at most as many token copies as routed experts, through
    `kernels.gathered.moe_ffn_gathered`; the shared experts are a dense SwiGLU over
    every token (`shared_experts_ffn`), added after.
    """
    batch, seq, d_model = x.shape
    chex.assert_equal_shape([w_gate, w_up])
    chex.assert_shape(w_gate, (None, d_model, None))
    chex.assert_shape(w_down, (w_gate.shape[0], w_gate.shape[2], d_model))
    chex.assert_equal(w_gate.shape[0], w_router.shape[-1] + n_shared)
    ids, gates, s_gates, stats = route_tokens(x, segment_ids, pool_sizes, w_router, routed_top_k, n_shared,
                                              w_shared_router)
    k = ids.shape[-1]
    n_routed = w_router.shape[-1]
    tokens, valid = x.reshape(-1, d_model), (segment_ids > 0).reshape(-1)
    # Routed experts through dispatch; the shared ones densely, next to it. A call with
    # at most as many copies as experts (a decode step) gathers each copy's expert weights
    # instead of reading all of them (emo_jax/kernels/gathered.py).
    if use_gathered(tokens.shape[0] * k, n_routed):
        ffn = moe_ffn_gathered
    y = ffn(tokens, ids.reshape(-1, k), gates.reshape(-1, k), valid,
            w_gate[:n_routed], w_up[:n_routed], w_down[:n_routed])
    if n_shared:
        y = y + shared_experts_ffn(tokens, valid, w_gate[n_routed:], w_up[n_routed:], w_down[n_routed:],
                                   None if s_gates is None else s_gates.reshape(-1, n_shared))
    y = y.reshape(batch, seq, d_model)
    chex.assert_shape(y, x.shape)
    return y, stats


def make_moe_layer(backend: str | kernels.MoEBackend = "auto") -> MoELayerFn:
    """`moe_layer` with the expert computation of `backend` (a name or a `kernels.MoEBackend`)."""
    moe_backend = backend if isinstance(backend, kernels.MoEBackend) else kernels.backend_for(backend)
    return functools.partial(moe_layer, ffn=moe_backend.moe_ffn)
