"""Mesh construction, logical-axis rules and shard_map expert parallelism."""

from emo_jax.parallel.expert_parallel import make_expert_parallel_moe, resolve_transport  # noqa: F401
from emo_jax.parallel.mesh import BATCH_AXES, MESH_AXES, build_mesh, check_batch_divides  # noqa: F401
from emo_jax.parallel.rules import LOGICAL_RULES, batch_sharding, param_shardings  # noqa: F401
