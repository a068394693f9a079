"""Train state and the jitted train step with micro-batch accumulation.

The step is one pure function `(state, batch, rng) -> (state, metrics)`. With
`loss.lb_scope = global_batch` and several micro-batches, it first runs a
forward-only pass over all micro-batches to collect the expert counts of the whole
step (routing is deterministic given params and RNG), then accumulates gradients
with the load-balance term using those global counts: the loss and its gradient are
exactly those of the global batch, at the cost of one extra forward pass.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from emo_jax.config import Config
from emo_jax.routing import RoutingStats
from emo_jax.train.objective import LossParts, objective
from emo_jax.train.optimizer import global_norm

Array = jax.Array
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any


def init_params(model: nn.Module, config: Config, key: Array) -> dict:
    """Unboxed float parameters of `model` for a [1, seq_len] input."""
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    variables = model.init({"params": key, "routing": key}, tokens, train=False)
    return nn.meta.unbox(variables["params"])


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, config: Config,
                     key: Array) -> TrainState:
    params = init_params(model, config, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def split_micro_batches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...]; micro-batch j takes rows j, j+n, ... so that every
    micro-batch is spread over all devices that shard the batch."""
    def split(x):
        return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def load_metrics(stats: RoutingStats, routed_counts: tuple[int, ...] | None = None) -> dict:
    """Per-layer expert load (max/mean, entropy of the assignment distribution), pool size.

    routed_counts: routed experts per layer when a pruned model's layers differ (their
    counts are zero-padded to the widest layer); None = every column is an expert.
    """
    if stats.expert_counts.ndim == 3:  # per-shard statistics [L, shards, N] ("local" scope)
        stats = jax.tree.map(lambda s: jnp.sum(s, axis=1), stats)
    counts = stats.expert_counts  # [L, N]
    freq = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    entropy = -jnp.sum(jnp.where(freq > 0, freq * jnp.log(freq), 0.0), axis=-1)
    if routed_counts is None:
        mean_load = jnp.mean(counts, -1)
    else:
        mean_load = jnp.sum(counts, -1) / jnp.asarray(routed_counts, jnp.float32)
    return {
        "load_max_over_mean": jnp.max(counts, -1) / jnp.maximum(mean_load, 1e-9),
        "load_entropy": entropy,
        "mean_pool_size": jnp.sum(stats.pool_size_sum) / jnp.maximum(jnp.sum(stats.document_count), 1.0),
    }


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, config: Config,
                    schedule: optax.Schedule | None = None) -> Callable:
    """Returns train_step(state, batch, rng) -> (state, metrics) (not yet jitted)."""
    n_micro = config.train.micro_batches
    routed_counts = config.model.routed_counts if len(set(config.model.routed_counts)) > 1 else None
    global_window = config.loss.lb_scope == "global_batch" and n_micro > 1

    def forward(params, mb, rng):
        return model.apply({"params": params}, mb["inputs"], mb["segment_ids"], mb["positions"],
                           train=True, rngs={"routing": rng})

    def micro_loss(params, mb, rng, step_tokens, lb_stats):
        logits, stats = forward(params, mb, rng)
        if lb_stats is None and n_micro == 1:
            lb_stats = None  # this micro-batch is the whole step
        parts = objective(logits, stats, mb, config, step_tokens=step_tokens, lb_stats=lb_stats,
                          num_micro_batches=n_micro)
        return parts.total, (parts, stats)

    def train_step(state: TrainState, batch: dict, rng: Array):
        batch = {k: batch[k] for k in BATCH_KEYS}
        micro = split_micro_batches(batch, n_micro)
        rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n_micro))
        params = state.params

        def tokens_of(mb: dict) -> Array:
            return jnp.sum(mb["loss_mask"].astype(jnp.float32))

        lb_stats = None
        if global_window:
            # The token count is summed inside this scan rather than before it: on a mesh
            # it is an all-reduce, and XLA:CPU's thunk executor does not order a top-level
            # collective against a while loop whose body holds collectives (the MoE
            # all-to-alls). Devices then enter them in different orders and wait until
            # the 40 s rendezvous timeout aborts the process. Inside the body, collectives
            # run in program order on every device. (BUILD_NOTES "Version quirks".)
            def count(carry, xs):
                stats_sum, tokens = carry
                mb, r = xs
                _, stats = forward(params, mb, r)
                return (jax.tree.map(jnp.add, stats_sum, jax.lax.stop_gradient(stats)), tokens + tokens_of(mb)), None
            zero = jax.eval_shape(lambda: forward(params, jax.tree.map(lambda x: x[0], micro), rngs[0])[1])
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (lb_stats, tokens), _ = jax.lax.scan(count, (zero, jnp.zeros((), jnp.float32)), (micro, rngs))
        else:
            tokens = tokens_of(batch)  # the accumulation scan below consumes it: ordered
        step_tokens = jnp.maximum(tokens, 1.0)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(carry, xs):
            grads, parts_sum, stats_sum = carry
            mb, r = xs
            (_, (parts, stats)), g = grad_fn(params, mb, r, step_tokens, lb_stats)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            parts_sum = jax.tree.map(jnp.add, parts_sum, parts)
            stats_sum = jax.tree.map(jnp.add, stats_sum, jax.lax.stop_gradient(stats))
            return (grads, parts_sum, stats_sum), None

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero_parts = LossParts(*(jnp.zeros((), jnp.float32) for _ in LossParts._fields))
        stats_shape = jax.eval_shape(lambda: forward(params, jax.tree.map(lambda x: x[0], micro), rngs[0])[1])
        zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
        (grads, parts, stats), _ = jax.lax.scan(accumulate, (zero_grads, zero_parts, zero_stats), (micro, rngs))

        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": parts.total, "cross_entropy": parts.cross_entropy, "load_balance": parts.load_balance,
            "router_z": parts.router_z, "output_z": parts.output_z, "grad_norm": global_norm(grads),
            "tokens": step_tokens, **load_metrics(stats, routed_counts),
        }
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
