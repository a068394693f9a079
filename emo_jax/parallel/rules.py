"""The one table that maps the model's logical axis names to mesh axes.

Order matters: the first rule naming a logical axis wins, and a mesh axis is used
at most once per array (Flax skips a mesh axis that an earlier dimension took).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from emo_jax.parallel.mesh import BATCH_AXES

LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("exp", "expert"),  # before any rule mapping to 'expert'
    ("embed", "fsdp"),  # parameters: FSDP shards the model dimension
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("router_exp", None),
    ("norm", None),
)


def logical_specs(boxed_params) -> object:
    """PartitionSpecs (of logical names) for a tree of nn.Partitioned parameters."""
    return nn.get_partition_spec(boxed_params)


def param_shardings(boxed_params, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> object:
    """NamedShardings on `mesh` for a tree of (possibly abstract) boxed parameters."""
    return nn.logical_to_mesh_sharding(logical_specs(boxed_params), mesh, list(rules))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[B, ...] arrays: rows sharded over data x fsdp x expert."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
