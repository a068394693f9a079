"""The train step: loss falls, LR schedule, weight-decay mask, micro-batch exactness,
load-balance scope, bfloat16."""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

sys.path.insert(0, os.path.dirname(__file__))
from helpers import progression_batch, tiny_config  # noqa: E402

from emo_jax.model import build_model  # noqa: E402
from emo_jax.train import init_train_state, learning_rate_schedule, make_optimizer, make_train_step  # noqa: E402


def flat(tree):
    return traverse_util.flatten_dict(tree)


# ------------------------------------------------------------------ (a) the loss falls


def test_tiny_config_loss_falls():
    cfg = tiny_config()
    assert cfg.train.steps == 50 and cfg.routing.pool == "random"
    model = build_model(cfg)
    opt = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.jit(lambda k: init_train_state(model, opt, cfg, k))(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, opt, cfg, learning_rate_schedule(cfg.optimizer, cfg.train.steps)))
    rng = np.random.default_rng(0)
    ces = []
    t0 = time.time()
    for i in range(cfg.train.steps):
        batch = progression_batch(rng, cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size)
        state, m = step(state, batch, jax.random.PRNGKey(i))
        ces.append(float(m["cross_entropy"]))
        assert math.isfinite(float(m["loss"])), (i, m)
    assert int(state.step) == 50
    assert ces[0] == pytest.approx(math.log(cfg.model.vocab_size), rel=0.05)  # ~uniform at init
    final = float(np.mean(ces[-10:]))
    assert final < 0.8 * ces[0], (ces[0], final)
    assert time.time() - t0 < 120


# ------------------------------------------------------------------ (b) schedule and decay


def hand_lr(step, peak, warmup, total, ratio):
    if step < warmup:
        return peak * step / warmup
    frac = min((step - warmup) / (total - warmup), 1.0)
    final = ratio * peak
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("peak,warmup,total,ratio", [(3e-3, 5, 50, 0.1), (4e-3, 2000, 238419, 0.1),
                                                     (1e-3, 10, 30, 0.0)])
def test_learning_rate_schedule(peak, warmup, total, ratio):
    cfg = tiny_config(f"optimizer.peak_lr={peak!r}", f"optimizer.warmup_steps={warmup}",
                      f"optimizer.final_lr_ratio={ratio!r}").optimizer
    sched = learning_rate_schedule(cfg, total)
    steps = sorted({0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2,
                    total - 1, total, total + 10})
    for s in steps:
        assert float(sched(s)) == pytest.approx(hand_lr(s, peak, warmup, total, ratio), rel=1e-5, abs=1e-12), s
    assert float(sched(0)) == 0.0
    assert float(sched(warmup)) == pytest.approx(peak, rel=1e-6)
    assert float(sched(total)) == pytest.approx(ratio * peak, rel=1e-5, abs=1e-12)  # final LR at the end
    if (warmup + total) % 2 == 0:  # halfway through the decay: the mean of peak and final
        assert float(sched((warmup + total) // 2)) == pytest.approx((peak + ratio * peak) / 2, rel=1e-6)


def test_weight_decay_mask_by_zero_gradient_updates():
    cfg = tiny_config("model.tie_embeddings=false", "optimizer.warmup_steps=2", "optimizer.weight_decay=0.1")
    model = build_model(cfg)
    opt = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = jax.jit(lambda k: init_train_state(model, opt, cfg, k))(jax.random.PRNGKey(0))
    params, opt_state = state.params, state.opt_state
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(opt.update)
    factor = 1.0
    p0 = flat(params)
    for i in range(4):
        lr = hand_lr(i, cfg.optimizer.peak_lr, 2, cfg.train.steps, cfg.optimizer.final_lr_ratio)
        updates, opt_state = update(zeros, opt_state, params)
        new = optax.apply_updates(params, updates)
        for path, p in flat(params).items():
            p, q = np.asarray(p, np.float64), np.asarray(flat(new)[path], np.float64)
            if path[-1] == "embedding":
                np.testing.assert_array_equal(q, p, err_msg=str(path))
            else:  # shrinks by exactly lr * wd * p
                np.testing.assert_allclose(q, p - lr * 0.1 * p, rtol=1e-6, atol=1e-12, err_msg=str(path))
        factor *= 1 - lr * 0.1
        params = new
    assert factor < 1  # decay did happen (the LR is not stuck at 0)
    for path, p in flat(params).items():
        if path[-1] != "embedding":
            np.testing.assert_allclose(np.asarray(p), np.asarray(p0[path]) * factor, rtol=1e-5)
    names = {path[-1] for path in p0}
    assert {"embedding", "lm_head", "router", "w_gate", "w_up", "w_down", "q_proj", "scale"} <= names


# ------------------------------------------------------------------ (c) micro-batch exactness


SMALL = ("data.seq_len=32", "model.max_seq_len=32")


def one_step(n_micro, scope, batch, *extra, optimizer=None):
    cfg = tiny_config(*SMALL, f"train.micro_batches={n_micro}", f"loss.lb_scope={scope}", *extra)
    model = build_model(cfg)
    opt = optimizer or optax.sgd(1.0)
    state = jax.jit(lambda k: init_train_state(model, opt, cfg, k))(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(make_train_step(model, opt, cfg))(state, batch, jax.random.PRNGKey(3))
    return state, new_state, {k: np.asarray(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def exactness_runs():
    rng = np.random.default_rng(1)
    # micro-batch j takes rows j, j+n, ...: with n=2 the two micro-batches see disjoint
    # token ranges, so their routing differs (used by the lb_scope test too)
    ranges = [(0, 60) if b % 2 == 0 else (300, 360) for b in range(8)]
    batch = progression_batch(rng, 8, 32, 512, row_ranges=ranges)
    batch["loss_mask"][2, 20:] = 0  # uneven loss-token counts across micro-batches
    pool = ("routing.pool=fixed", "routing.pool_size=4")
    runs = {n: one_step(n, "global_batch", batch, *pool) for n in (1, 2, 4)}
    return dict(runs, batch=batch, pool=pool)


@pytest.mark.parametrize("n_micro", [2, 4])
def test_micro_batches_give_the_global_batch_step(exactness_runs, n_micro):
    state0, ref_state, ref = exactness_runs[1]
    _, state, m = exactness_runs[n_micro]
    for key in ("loss", "cross_entropy", "load_balance", "router_z", "output_z", "grad_norm", "tokens"):
        np.testing.assert_allclose(m[key], ref[key], rtol=2e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(m["load_max_over_mean"], ref["load_max_over_mean"], rtol=1e-6)
    assert ref["load_balance"] > 0.5 and ref["grad_norm"] > 0
    p_ref, p, p0 = flat(ref_state.params), flat(state.params), flat(state0.params)
    moved = 0.0
    for path in p_ref:
        np.testing.assert_allclose(np.asarray(p[path]), np.asarray(p_ref[path]), rtol=0, atol=1e-5,
                                   err_msg=str(path))
        moved = max(moved, float(np.abs(np.asarray(p_ref[path]) - np.asarray(p0[path])).max()))
    assert moved > 1e-3  # SGD(lr=1): updated params - initial = -gradient, not trivially small


def test_micro_batch_lb_scope_differs_from_global(exactness_runs):
    _, _, glob = exactness_runs[2]
    _, _, micro = one_step(2, "micro_batch", exactness_runs["batch"], *exactness_runs["pool"])
    print("load_balance global", glob["load_balance"], "micro", micro["load_balance"])
    np.testing.assert_allclose(micro["cross_entropy"], glob["cross_entropy"], rtol=1e-6)
    assert micro["load_balance"] > glob["load_balance"] * 1.02, (micro["load_balance"], glob["load_balance"])


# ------------------------------------------------------------------ (d) bfloat16


def test_bfloat16_step_is_nan_free():
    batch = progression_batch(np.random.default_rng(3), 8, 32, 512)
    cfg_extra = ("model.dtype=bfloat16", "optimizer.warmup_steps=0")
    state0, state, m = one_step(1, "global_batch", batch, *cfg_extra,
                                optimizer=make_optimizer(tiny_config(*SMALL, *cfg_extra).optimizer, 50))
    for k, v in m.items():
        assert np.all(np.isfinite(v)), k
    assert m["cross_entropy"] == pytest.approx(math.log(512), rel=0.05)
    changed = 0
    for path, p in flat(state.params).items():
        assert p.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(p))), path
        changed += int(not np.array_equal(np.asarray(p), np.asarray(flat(state0.params)[path])))
    assert changed == len(flat(state.params))
