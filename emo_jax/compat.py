"""Version-sensitive JAX imports in one place (jax 0.10.x on Python 3.11, 0.11+ elsewhere)."""

from __future__ import annotations

import contextlib

import jax

# shard_map moved to the top level (jax.experimental.shard_map is deprecated and its
# `check_rep` became `check_vma`).
if hasattr(jax, "shard_map"):
    shard_map = jax.shard_map
else:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
        return _old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)

AxisType = jax.sharding.AxisType


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices=None) -> jax.sharding.Mesh:
    """A mesh with Auto axis types on every axis: GSPMD may reshard inputs, and a
    shard_map reshards its inputs to `in_specs`, on jax 0.10 and 0.11 alike (the
    default became Explicit, which rejects mismatched shardings instead)."""
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def use_mesh(mesh: jax.sharding.Mesh):
    """Context manager that makes `mesh` the current mesh."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):  # pragma: no cover
        return jax.sharding.use_mesh(mesh)
    return contextlib.nullcontext()  # pragma: no cover


def has_ragged_all_to_all() -> bool:
    """ragged_all_to_all exists in jax >= 0.5 but XLA:CPU cannot compile it."""
    return hasattr(jax.lax, "ragged_all_to_all") and jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")


def pallas_modules():
    """(pallas, pallas.tpu) modules, imported lazily (they pull in Mosaic)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    return pl, pltpu
