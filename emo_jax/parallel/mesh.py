"""Builds the device mesh from a MeshConfig, with clear errors for impossible shapes."""

from __future__ import annotations

import math

import jax

from emo_jax.compat import make_mesh
from emo_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # outside the MoE block the batch is sharded over all three


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, ...]:
    """Resolves -1 and checks that the axes multiply to the device count."""
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not "
                              f"divide the {device_count} devices; choose sizes whose product divides {device_count}.")
        sizes[sizes.index(-1)] = device_count // fixed
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
                          f"{device_count} are present; make the axis sizes multiply to {device_count} "
                          "(or set one axis to -1).")
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    return make_mesh(mesh_shape(cfg, len(devices)), MESH_AXES, devices=devices)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divides(mesh: jax.sharding.Mesh, global_batch: int, micro_batches: int = 1) -> None:
    shards = batch_shards(mesh)
    per_micro = global_batch // micro_batches
    if global_batch % micro_batches or per_micro % shards:
        raise ConfigError(f"data.global_batch_size={global_batch} / train.micro_batches={micro_batches} = "
                          f"{global_batch / micro_batches:g} rows per micro-batch must be divisible by the "
                          f"{shards} batch shards of the mesh (data x fsdp x expert).")


def check_experts_divide(mesh: jax.sharding.Mesh, n_experts: int, key: str = "model.n_experts") -> None:
    if n_experts % mesh.shape["expert"]:
        fix = (f"choose mesh.expert dividing {n_experts}" if key == "model.n_experts" else
               "run this pruned model with mesh.expert=1")
        raise ConfigError(f"{key}={n_experts} is not divisible by the mesh's expert axis "
                          f"({mesh.shape['expert']}); {fix}.")
