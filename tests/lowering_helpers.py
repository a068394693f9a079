"""Lowering for an accelerator without one: the abstract device jax's Pallas needs to know."""

from __future__ import annotations

import contextlib

import jax


def has_abstract_device() -> bool:
    from jax._src import mesh as mesh_lib
    return hasattr(mesh_lib, "AbstractDevice")


@contextlib.contextmanager
def abstract_device(device_kind: str, platform: str):
    """An abstract mesh on one device of `device_kind` (Mosaic's lowering reads the TPU
    generation from it; jax >= 0.12's Triton lowering reads the GPU's compute capability).
    Uses the private `jax._src.mesh.AbstractDevice`: tests only. Trace only abstract
    arguments (ShapeDtypeStruct) inside: jax 0.12 refuses concrete arrays there."""
    from jax._src import mesh as mesh_lib

    if not hasattr(mesh_lib, "AbstractDevice"):  # pragma: no cover - older jax
        yield
        return
    device = mesh_lib.AbstractDevice(device_kind, 1, platform)
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)):
        yield


def abstract_gpu(device_kind: str = "NVIDIA H200"):
    """`abstract_device` for one NVIDIA GPU (older jax's Triton lowering needs none)."""
    return abstract_device(device_kind, "gpu")


def shapes_only(tree):
    """Every jax.Array in `tree` as a ShapeDtypeStruct."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a, tree)
