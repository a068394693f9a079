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


def varying_axes(*arrays) -> frozenset:
    """Mesh axes over which any of `arrays` varies inside shard_map (empty outside)."""
    axes = set()
    for a in arrays:
        aval = jax.typeof(a)
        vma = getattr(aval, "vma", None)  # older jax
        if vma is None:  # jax 0.10+: ManualAxisType(varying=..., ...)
            vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
        axes |= set(vma or ())
    return frozenset(axes)


def vary_like(x, *like):
    """Marks `x` as varying over every axis that `like` varies over (shard_map's
    check_vma needs both branches of a cond, and a loop carry, to agree)."""
    missing = tuple(sorted(varying_axes(*like) - varying_axes(x)))
    if not missing:
        return x
    return jax.lax.pcast(x, missing, to="varying")


def psum_to_match(x, like):
    """Sums `x` over the mesh axes it varies over but `like` does not: the
    cotangent of an input that shard_map replicates over those axes (what
    autodiff does on its own, and a custom VJP has to do by hand)."""
    extra = tuple(sorted(varying_axes(x) - varying_axes(like)))
    return jax.lax.psum(x, extra) if extra else x


def vary_all(*arrays):
    """`arrays`, each marked varying over the union of the axes any of them varies over
    (a pallas_call inside shard_map wants inputs and outputs of one varying type)."""
    return tuple(vary_like(a, *arrays) for a in arrays)


def out_struct(shape, dtype, like=None) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct` for a pallas_call output that varies like `like` inside
    shard_map (check_vma wants it spelled out: `manual_axis_type=` on jax 0.10+,
    `vma=` before)."""
    if like is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(like)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    vma = getattr(aval, "vma", None)  # pragma: no cover - older jax
    return jax.ShapeDtypeStruct(shape, dtype, vma=vma) if vma is not None else jax.ShapeDtypeStruct(shape, dtype)


# ------------------------------------------------------------------------------ flax.nnx
# nnx.Optimizer changed in flax 0.11: `wrt` became a required keyword and `update` takes
# the model first (`update(model, grads)`); before, `Optimizer(model, tx)` held the model
# and `update(grads)`. Variables are read with `get_value()` (flax >= 0.12) or `.value`.


def nnx_optimizer(model, tx, wrt=None):
    """`nnx.Optimizer` over `model`'s `wrt` variables (default nnx.Param) on any flax version."""
    import inspect

    from flax import nnx
    wrt = nnx.Param if wrt is None else wrt
    if "wrt" in inspect.signature(nnx.Optimizer.__init__).parameters:
        return nnx.Optimizer(model, tx, wrt=wrt)
    return nnx.Optimizer(model, tx)  # pragma: no cover - flax < 0.11 (wrt = nnx.Param)


def nnx_update(optimizer, model, grads) -> None:
    """One optimizer step in place: `optimizer.update(model, grads)` (flax >= 0.11) or `update(grads)`."""
    import inspect
    positional = [p for p in inspect.signature(optimizer.update).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2:
        optimizer.update(model, grads)
    else:  # pragma: no cover - flax < 0.11
        optimizer.update(grads)


def nnx_value(variable):
    """The array an nnx.Variable holds."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def nnx_data(value):
    """Marks a container attribute of an nnx.Module as data (flax >= 0.12 wants it spelled out)."""
    from flax import nnx
    return nnx.data(value) if hasattr(nnx, "data") else value

def splash_attention_module():
    """jax's TPU splash attention (Pallas/Mosaic), imported lazily.

    `jax.experimental.pallas.ops.tpu.splash_attention` on jax 0.10-0.12: make_splash_mha,
    MultiHeadMask, CausalMask, SegmentIds, BlockSizes."""
    from jax.experimental.pallas.ops.tpu import splash_attention
    return splash_attention


def gpu_flash_attention_module():
    """jax's GPU flash attention (Pallas/Triton), imported lazily.

    `jax.experimental.pallas.ops.gpu.attention` on jax 0.10-0.12: mha(q, k, v,
    segment_ids, sm_scale, causal, block_sizes, ..., interpret) on [B, S, H, D], BlockSizes."""
    from jax.experimental.pallas.ops.gpu import attention
    return attention
