"""The sharded train step (make_sharded_trainer) against the single-device make_train_step,
and the three load-balance scopes (global_batch, micro_batch, local) on 8 devices.

To compare gradients through the optimizer, the step uses AdamW with eps = 1, no weight
decay and no warmup: the first update is then -lr * g / (|g| + 1), a smooth monotone
function of each gradient entry (with the default eps = 1e-8 it would be ~lr * sign(g),
which float noise can flip), so equal updates mean equal gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emo_jax import losses
from emo_jax.model import build_model
from emo_jax.train import init_train_state, learning_rate_schedule, make_optimizer, make_train_step
from emo_jax.train.sharded import make_sharded_trainer
from emo_jax.train.step import split_micro_batches

from helpers import progression_batch, tiny_config

VOCAB = 128
SMALL = ("model.n_layers=1", "model.d_model=32", "model.head_dim=8", "model.n_heads=4",
         "model.expert_hidden=16", f"model.vocab_size={VOCAB}", "data.seq_len=16",
         "optimizer.warmup_steps=0", "optimizer.peak_lr=0.5", "optimizer.eps=1.0",
         "optimizer.weight_decay=0.0", "train.steps=4")
RTOL = 2e-5


def _config(*extra):
    return tiny_config(*SMALL, *extra)


def _mesh_overrides(shape):
    return (f"mesh.data={shape[0]}", f"mesh.fsdp={shape[1]}", f"mesh.expert={shape[2]}")


def _assert_tree_close(actual, expected, rtol=RTOL, what=""):
    flat_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_e = jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        a, e = np.asarray(a), np.asarray(e)
        scale = max(float(np.max(np.abs(e))), 1e-6)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _deltas(new_params, old_params):
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_params, old_params)


class SingleDevice:
    """make_train_step on one device, plus the forward pass for hand-made references."""

    def __init__(self, config, key=jax.random.PRNGKey(0)):
        self.config = config
        self.model = build_model(config)
        self.opt = make_optimizer(config.optimizer, config.train.steps)
        self.state = init_train_state(self.model, self.opt, config, key)
        self.step = jax.jit(make_train_step(self.model, self.opt, config,
                                            learning_rate_schedule(config.optimizer, config.train.steps)))
        self.stats = jax.jit(lambda params, b: self.model.apply(
            {"params": params}, b["inputs"], b["segment_ids"], b["positions"], train=True,
            rngs={"routing": jax.random.PRNGKey(99)})[1])

    def lb(self, params, batch) -> float:
        """mean over layers of L_LB over the tokens of `batch`, in one pass."""
        st = self.stats(params, batch)
        m = self.config.model
        return float(jnp.mean(losses.load_balance_loss(st, m.n_routed_experts, m.routed_top_k)))


def _sharded_step(config, state, batch, rng):
    tr = make_sharded_trainer(config)
    # The step donates its state. device_put may alias a buffer already on its target
    # device (replicated params on mesh 8x1x1 reuse device 0's), so copy first.
    copied = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    sharded_state = jax.device_put(copied, tr.state_shardings)
    return tr.step(sharded_state, batch, rng)


# --- the sharded step equals the single-device step on every mesh ------------------------

MESH_CASES = [((8, 1, 1), 1), ((2, 1, 4), 2), ((1, 2, 4), 1), ((1, 1, 8), 1), ((2, 2, 2), 2)]
STEP_RNG = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def step_batch():
    return progression_batch(np.random.default_rng(0), 16, 16, VOCAB)


@pytest.fixture(scope="module")
def single_refs(step_batch):
    refs = {}
    for mb in (1, 2):
        single = SingleDevice(_config(f"train.micro_batches={mb}", "data.global_batch_size=16"))
        new_state, metrics = single.step(single.state, step_batch, STEP_RNG)
        refs[mb] = (single, new_state, metrics)
    return refs


@pytest.mark.parametrize("shape, micro_batches", MESH_CASES,
                         ids=[f"{'x'.join(map(str, s))}-mb{m}" for s, m in MESH_CASES])
def test_sharded_step_matches_single_device(single_refs, step_batch, shape, micro_batches):
    single, ref_state, ref_metrics = single_refs[micro_batches]
    config = _config(f"train.micro_batches={micro_batches}", "data.global_batch_size=16",
                     *_mesh_overrides(shape))
    new_state, metrics = _sharded_step(config, single.state, step_batch, STEP_RNG)
    assert int(new_state.step) == 1
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        _assert_tree_close(metrics[key], ref_metrics[key], what=f"metrics[{key}]")
    ref_delta = _deltas(ref_state.params, single.state.params)
    assert max(float(np.max(np.abs(d))) for d in jax.tree.leaves(ref_delta)) > 1e-3  # the step moved
    _assert_tree_close(_deltas(new_state.params, single.state.params), ref_delta, rtol=1e-4, what="update")
    _assert_tree_close(new_state.opt_state, ref_state.opt_state, rtol=1e-4, what="opt_state")


def test_sharded_init_equals_single_device_init(full_optimization):
    # Bitwise, as training compiles it. (With most optimisations off, 4% of one weight's
    # entries differ by an ulp between the two programs: float rounding, not the data.)
    single = SingleDevice(_config("data.global_batch_size=16"))
    tr = make_sharded_trainer(_config("data.global_batch_size=16", *_mesh_overrides((2, 1, 4))))
    state = tr.init_state(jax.random.PRNGKey(0))
    _assert_tree_close(state.params, single.state.params, rtol=0, what="init")
    w = state.params["layer_0"]["moe"]["w_gate"]
    assert w.sharding.spec == tr.state_shardings.params["layer_0"]["moe"]["w_gate"].spec


# --- load-balance scopes over 8 devices x 4 micro-batches ---------------------------------

N_MICRO, ROWS = 4, 32
LB_MESH = (2, 1, 4)
ROUTER_SCALE = 25.0  # sharper routing, so that the scopes differ clearly


def _lb_config(scope, micro_batches=N_MICRO):
    return _config("routing.pool=fixed", "routing.pool_size=5", f"loss.lb_scope={scope}",
                   f"train.micro_batches={micro_batches}", f"data.global_batch_size={ROWS}",
                   *_mesh_overrides(LB_MESH))


@pytest.fixture(scope="module")
def lb_setup():
    """Rows whose tokens come from different vocabulary slices: every device (and every
    micro-batch) sees a different token distribution, so its expert load differs."""
    band = VOCAB // 8
    row_ranges = [((r % 8) * band, (r % 8 + 1) * band) for r in range(ROWS)]
    batch = progression_batch(np.random.default_rng(1), ROWS, 16, VOCAB, row_ranges=row_ranges)
    single = SingleDevice(_lb_config("global_batch", micro_batches=1))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * ROUTER_SCALE if "router" in jax.tree_util.keystr(p) else x, single.state.params)
    single.state = single.state.replace(params=params)
    return single, batch


def _rows_of(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def test_global_batch_lb_equals_one_pass_lb(lb_setup):
    single, batch = lb_setup
    rng = jax.random.PRNGKey(3)
    new_state, metrics = _sharded_step(_lb_config("global_batch"), single.state, batch, rng)
    one_pass = single.lb(single.state.params, batch)
    np.testing.assert_allclose(float(metrics["load_balance"]), one_pass, rtol=1e-6, atol=1e-6)
    # The whole step, gradients included, equals the single-device step over the whole
    # batch in one micro-batch: the global-batch balance loss is exact, not approximate.
    ref_state, ref_metrics = single.step(single.state, batch, rng)
    np.testing.assert_allclose(float(ref_metrics["load_balance"]), one_pass, rtol=1e-6)
    for key in ("loss", "cross_entropy", "router_z", "grad_norm"):
        np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=RTOL, err_msg=key)
    _assert_tree_close(_deltas(new_state.params, single.state.params),
                       _deltas(ref_state.params, single.state.params), rtol=1e-4, what="update")


def test_micro_batch_lb_is_mean_of_per_micro_batch_global_losses(lb_setup):
    single, batch = lb_setup
    _, metrics = _sharded_step(_lb_config("micro_batch"), single.state, batch, jax.random.PRNGKey(3))
    micro = split_micro_batches(batch, N_MICRO)
    per_micro = [single.lb(single.state.params, {k: v[j] for k, v in micro.items()}) for j in range(N_MICRO)]
    expected = float(np.mean(per_micro))
    np.testing.assert_allclose(float(metrics["load_balance"]), expected, rtol=1e-6, atol=1e-6)
    # Micro-batches see different data here, so the window matters.
    assert abs(expected - single.lb(single.state.params, batch)) > 1e-3


def test_local_lb_is_per_device_per_micro_batch_and_differs(lb_setup):
    single, batch = lb_setup
    _, metrics = _sharded_step(_lb_config("local"), single.state, batch, jax.random.PRNGKey(3))
    # Batch row r lives on device r // 4 (rows are sharded in contiguous blocks) and is in
    # micro-batch r % 4, so every (device, micro-batch) window holds exactly one row.
    rows_per_window = ROWS // (8 * N_MICRO)
    assert rows_per_window == 1
    per_window = [single.lb(single.state.params, _rows_of(batch, slice(r, r + 1))) for r in range(ROWS)]
    expected_local = float(np.mean(per_window))
    np.testing.assert_allclose(float(metrics["load_balance"]), expected_local, rtol=1e-5, atol=1e-6)
    global_lb = single.lb(single.state.params, batch)
    assert expected_local - global_lb > 0.05, (expected_local, global_lb)
