"""Training over a device mesh: sharded state, sharded batches, one jitted step.

Parameters are placed by the logical-axis rules (`parallel.rules`); the batch is
sharded over data x fsdp x expert; the MoE layers run expert-parallel under
shard_map with their routing statistics psum'd across the mesh (or kept per shard
for the "local" load-balance ablation).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from emo_jax.compat import use_mesh
from emo_jax.config import Config
from emo_jax.model import build_model
from emo_jax.parallel import expert_parallel, mesh as mesh_lib, rules
from emo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from emo_jax.train.step import TrainState, make_train_step


class ShardedTrainer(NamedTuple):
    mesh: jax.sharding.Mesh
    model: nn.Module
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the restore target
    batch_sharding: jax.sharding.NamedSharding
    init_state: Callable[[jax.Array], TrainState]
    step: Callable  # (state, batch, rng) -> (state, metrics)


def stats_mode(config: Config) -> str:
    return "local" if config.loss.lb_scope == "local" else "global"


def build_sharded_model(config: Config, mesh: jax.sharding.Mesh) -> nn.Module:
    mesh_lib.check_experts_divide(mesh, config.model.n_experts)
    if config.model.layer_experts is not None:
        for layer, count in enumerate(config.model.layer_experts):
            mesh_lib.check_experts_divide(mesh, count, f"model.layer_experts[{layer}]")
    moe_fn = expert_parallel.make_expert_parallel_moe(mesh, config.kernels.transport, stats_mode(config),
                                                      config.kernels.moe_backend, config.kernels.exchange_capacity)
    return build_model(config, moe_fn)


def make_sharded_trainer(config: Config, mesh: jax.sharding.Mesh | None = None,
                         total_steps: int | None = None) -> ShardedTrainer:
    mesh = mesh or mesh_lib.build_mesh(config.mesh)
    mesh_lib.check_batch_divides(mesh, config.data.global_batch_size, config.train.micro_batches)
    total_steps = total_steps or config.train.steps
    model = build_sharded_model(config, mesh)
    optimizer = make_optimizer(config.optimizer, total_steps)
    schedule = learning_rate_schedule(config.optimizer, total_steps)
    logical_rules = list(rules.LOGICAL_RULES)

    def in_context(fn):
        def wrapped(*args):
            with use_mesh(mesh), nn.logical_axis_rules(logical_rules):
                return fn(*args)
        return wrapped

    tokens = jnp.zeros((mesh_lib.batch_shards(mesh), config.data.seq_len), jnp.int32)

    def init_boxed(key):
        return model.init({"params": key, "routing": key}, tokens, train=False)["params"]

    def init_state_fn(key):
        params = nn.meta.unbox(init_boxed(key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    with use_mesh(mesh), nn.logical_axis_rules(logical_rules):
        boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
        param_shardings = rules.param_shardings(boxed, mesh)
        abstract_state = jax.eval_shape(init_state_fn, jax.random.PRNGKey(0))
    replicated = rules.replicated(mesh)
    # Optimizer moments mirror their parameters; scalars (counts) are replicated.
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    batch_sharding = rules.batch_sharding(mesh)

    init_state = in_context(jax.jit(init_state_fn, out_shardings=state_shardings))
    step = jax.jit(make_train_step(model, optimizer, config, schedule),
                   in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    abstract_with_shardings = jax.tree.map(
        lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state, state_shardings)
    return ShardedTrainer(mesh, model, optimizer, state_shardings, abstract_with_shardings, batch_sharding,
                          init_state, in_context(step))
