"""A shared check for MoE expert backends: a whole dropless SwiGLU layer (dispatch, the
three grouped matmuls, combine) against the reference layer, with padding tokens, on the
value and the gradient of every input."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.kernels.reference import moe_ffn


def assert_layer_matches_reference(ffn: Callable, rtol: float = 2e-5, atol: float = 2e-5) -> None:
    """ffn(x, ids, gates, valid, w_gate, w_up, w_down) equals the reference `moe_ffn` on
    40 tokens (d 16, hidden 24, 6 experts, top-3, ~20% padding): value and gradients with
    respect to x, gates and the three weights; padding tokens give 0."""
    rng = np.random.default_rng(3)
    tokens, d, h, e, k = 40, 16, 24, 6, 3
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(tokens)]), jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(tokens, k)), jnp.float32)
    valid = jnp.asarray(rng.uniform(size=tokens) > 0.2)
    w = [jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)
         for shape in ((e, d, h), (e, d, h), (e, h, d))]

    def run(layer):
        loss = lambda *args: jnp.sum(jnp.sin(layer(args[0], ids, args[1], valid, *args[2:])))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, gates, *w)

    (v_got, g_got), (v_ref, g_ref) = run(ffn), run(moe_ffn)
    np.testing.assert_allclose(float(v_got), float(v_ref), rtol=rtol, atol=atol)
    for got, want, name in zip(g_got, g_ref, ("x", "gates", "w_gate", "w_up", "w_down")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=name, rtol=rtol, atol=atol)
    out = ffn(x, ids, gates, valid, *w)
    assert not np.any(np.asarray(out)[~np.asarray(valid)]), "padding tokens give 0"
