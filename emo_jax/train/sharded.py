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

from emo_jax import artifact
from emo_jax.compat import use_mesh
from emo_jax.config import Config, to_dict
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
    init_state: Callable[[jax.Array], TrainState]  # random init, or train.init_from's parameters
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

    def init_state_fn(key):
        params = nn.meta.unbox(model.init({"params": key, "routing": key}, tokens, train=False)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    abstract_params = artifact.abstract_params(config, mesh)
    param_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    replicated = rules.replicated(mesh)
    # Optimizer moments mirror their parameters; scalars (counts) are replicated.
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    batch_sharding = rules.batch_sharding(mesh)

    init_random = in_context(jax.jit(init_state_fn, out_shardings=state_shardings))
    init_optimizer = in_context(jax.jit(optimizer.init, out_shardings=opt_shardings))

    def init_state(key):
        """A fresh state: random parameters, or those of train.init_from (fresh optimizer, step 0)."""
        if not config.train.init_from:
            return init_random(key)
        params = load_init_params(config, mesh)
        return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                          opt_state=init_optimizer(params))

    step = jax.jit(make_train_step(model, optimizer, config, schedule),
                   in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=abstract_params,
        opt_state=jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                               abstract_opt, opt_shardings))
    return ShardedTrainer(mesh, model, optimizer, state_shardings, abstract_state, batch_sharding,
                          init_state, in_context(step))


# Model keys that fine-tuning may change: they do not touch the parameters.
INIT_FROM_MAY_DIFFER = ("dtype", "remat", "init_std")


def load_init_params(config: Config, mesh: jax.sharding.Mesh) -> dict:
    """The parameters of `train.init_from` on this mesh, after checking that its model is this run's."""
    source_config, _ = artifact.read_config(config.train.init_from)  # checked before any parameter is read
    ours, theirs = to_dict(config)["model"], to_dict(source_config)["model"]
    differ = [k for k in ours if ours[k] != theirs[k] and k not in INIT_FROM_MAY_DIFFER]
    if differ:
        key = differ[0]
        raise artifact.ArtifactError(
            f"train.init_from={config.train.init_from}: its model.{key}={theirs[key]!r} but this config has "
            f"model.{key}={ours[key]!r} ({len(differ)} differing model key(s)); fine-tune with the source's model "
            "section (an emo_jax model folder's config.yaml; `emo-jax convert` writes one for a Hugging Face folder).")
    loaded = artifact.load(config.train.init_from, mesh=mesh)
    if jax.process_index() == 0:
        print(f"initialised from {loaded.source.describe()} (fresh optimizer state, step 0)", flush=True)
    return loaded.params
