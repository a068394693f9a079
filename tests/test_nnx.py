"""emo_jax.nnx_model.EmoLM: the model as a flax.nnx module.

One nnx.Optimizer step equals one step of the project's Linen train step (same
initial parameters, batch, routing key and optax transform); the module works with
nnx.split/merge and loads model artifacts; the README example runs as written.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emo_jax import artifact
from emo_jax.compat import nnx_optimizer, nnx_update
from emo_jax.model import build_model
from emo_jax.nnx_model import EmoLM, lm_loss
from emo_jax.train import init_train_state, make_optimizer, make_train_step
from helpers import progression_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ("model.d_model=32", "model.head_dim=8", "model.expert_hidden=32", "model.max_seq_len=64",
         "data.seq_len=64", "data.global_batch_size=4", "model.init_std=0.3",
         "optimizer.warmup_steps=0")  # the first step at the peak learning rate (warmup starts at 0)


def _batch(config) -> dict:
    batch = progression_batch(np.random.default_rng(0), config.data.global_batch_size, config.data.seq_len,
                              config.model.vocab_size)
    return {k: jnp.asarray(v) for k, v in batch.items()}


# Jitted: op-by-op dispatch of the whole model is slow on CPU.
_logits = nnx.jit(lambda model, tokens: model(tokens)[0])
_loss = nnx.jit(lambda model, batch, key: lm_loss(model, batch, key).total)


def _nnx_step(model, optimizer, batch, key):
    loss, grads = nnx.value_and_grad(lambda m: lm_loss(m, batch, key).total)(model)
    nnx_update(optimizer, model, grads)
    return loss


# Random document pools (EMO training), a fixed pool, a standard MoE with 2 shared experts,
# and a pruned model (8 and 5 experts). `EmoLM` wraps the one Linen model whatever the
# routing, whose variants test_train_core.py, test_moe.py and test_parallel_train.py cover: the fixed pool
# and the shared-expert variant (~25 s each to compile on 2 cores) run with -m slow.
@pytest.mark.parametrize("overrides", [
    (),
    pytest.param(("routing.pool=fixed", "routing.pool_size=5"), marks=pytest.mark.slow),
    pytest.param(("routing.pool=none", "model.n_shared_experts=2", "model.top_k=4"), marks=pytest.mark.slow),
    ("model.layer_experts=[8,5]",),
], ids=["random_pool", "fixed_pool", "stdmoe_2shared", "pruned"])
def test_one_nnx_optimizer_step_equals_the_linen_train_step(overrides):
    config = tiny_config(*SMALL, *overrides)
    batch, rng = _batch(config), jax.random.PRNGKey(7)
    model = build_model(config)
    tx = make_optimizer(config.optimizer, config.train.steps)
    state = init_train_state(model, tx, config, jax.random.PRNGKey(3))
    start = jax.tree.map(jnp.copy, state.params)
    linen_state, metrics = jax.jit(make_train_step(model, tx, config))(state, batch, rng)

    nnx_model = EmoLM(config, params=start)
    optimizer = nnx_optimizer(nnx_model, make_optimizer(config.optimizer, config.train.steps))
    # The Linen step routes micro-batch i with fold_in(rng, i); one micro-batch here.
    loss = nnx.jit(_nnx_step)(nnx_model, optimizer, batch, jax.random.fold_in(rng, 0))

    np.testing.assert_allclose(float(loss), float(metrics["loss"]), rtol=1e-6)
    moved = 0.0
    for (path, got), want, before in zip(jax.tree_util.tree_leaves_with_path(nnx_model.linen_params()),
                                         jax.tree.leaves(linen_state.params), jax.tree.leaves(start)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
        moved = max(moved, float(jnp.max(jnp.abs(want - before))))
    assert moved > 1e-4  # the step did change the parameters


def test_routing_key_matters_and_inference_needs_none():
    """The test above could not tell keys apart if the pools ignored them."""
    config = tiny_config(*SMALL)
    model = EmoLM(config, rngs=nnx.Rngs(params=0))
    batch = _batch(config)
    a = _loss(model, batch, jax.random.PRNGKey(0))
    b = _loss(model, batch, jax.random.PRNGKey(1))
    assert float(a) != float(b)
    logits = _logits(model, batch["inputs"])  # eval: no pool, no key
    assert logits.shape == (4, 64, config.model.vocab_size)


def test_init_split_merge_and_load(tmp_path):
    config = tiny_config(*SMALL)
    model = EmoLM(config, rngs=nnx.Rngs(params=0))
    abstract = artifact.abstract_params(config)
    params = model.linen_params()
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)))
    w_gate = model.params["layer_0"]["moe"]["w_gate"]
    assert isinstance(w_gate, nnx.Param) and w_gate.get_metadata()["logical_axes"] == ("exp", "embed", "mlp")

    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    np.testing.assert_array_equal(np.asarray(_logits(model, tokens)), np.asarray(_logits(again, tokens)))

    artifact.save(tmp_path / "m", config, params)
    from emo_jax.compat import make_mesh
    from emo_jax.parallel.mesh import MESH_AXES
    mesh = make_mesh((2, 1, 4, 1), MESH_AXES)
    loaded = EmoLM.load(tmp_path / "m", mesh=mesh)
    assert loaded.params["layer_0"]["moe"]["w_gate"].get_value().sharding.spec[0] == "expert"
    np.testing.assert_allclose(np.asarray(_logits(loaded, tokens)), np.asarray(_logits(model, tokens)),
                               rtol=1e-5, atol=1e-5)


def test_readme_example_runs():
    """The README's "From flax.nnx" block, executed as written (from the repository root)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("### From flax.nnx"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    losses = namespace["losses"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert namespace["logits"].shape == (8, 128, 512)
