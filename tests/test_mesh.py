"""Mesh construction, logical-axis rules and transport selection (8 emulated CPU devices)."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from emo_jax import compat
from emo_jax.config import ConfigError, MeshConfig
from emo_jax.parallel import LOGICAL_RULES, build_mesh, check_batch_divides, resolve_transport
from emo_jax.parallel.mesh import MESH_AXES, batch_shards, check_experts_divide, mesh_shape
from emo_jax.train.sharded import make_sharded_trainer

from helpers import tiny_config


@pytest.mark.parametrize("cfg, devices, shape", [
    (MeshConfig(), 1, (1, 1, 1, 1)),
    (MeshConfig(data=-1, expert=2), 4, (2, 1, 2, 1)),
    (MeshConfig(data=2, fsdp=-1, expert=4, tensor=2), 64, (2, 4, 4, 2)),
    (MeshConfig(data=16, fsdp=1, expert=8), 128, (16, 1, 8, 1)),
])
def test_mesh_shape_for_other_device_counts(cfg, devices, shape):
    """The -1 fill for device counts other than the 8 emulated here (a pure function)."""
    assert mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize("cfg, shape", [
    (MeshConfig(data=-1), (8, 1, 1, 1)),
    (MeshConfig(data=2, fsdp=-1, expert=2), (2, 2, 2, 1)),
    (MeshConfig(data=1, fsdp=1, expert=-1), (1, 1, 8, 1)),
    (MeshConfig(data=2, fsdp=1, expert=2, tensor=-1), (2, 1, 2, 2)),
    (MeshConfig(data=2, fsdp=2, expert=2, tensor=1), (2, 2, 2, 1)),
])
def test_build_mesh_fill(cfg, shape):
    mesh = build_mesh(cfg)
    assert tuple(mesh.axis_names) == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape
    assert mesh.devices.size == 8
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert batch_shards(mesh) == shape[0] * shape[1] * shape[2]


def test_build_mesh_on_device_subset():
    mesh = build_mesh(MeshConfig(data=-1, expert=2), devices=jax.devices()[:4])
    assert (mesh.shape["data"], mesh.shape["expert"]) == (2, 2)


@pytest.mark.parametrize("cfg, fragment", [
    (MeshConfig(data=3, fsdp=1, expert=1), "uses 3 devices but 8 are present"),
    (MeshConfig(data=2, fsdp=2, expert=4), "uses 16 devices but 8 are present"),
    (MeshConfig(data=-1, expert=3), "do not divide the 8 devices"),
    (MeshConfig(data=-1, fsdp=16), "do not divide the 8 devices"),
])
def test_mesh_not_dividing_devices_is_a_clear_error(cfg, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_mesh(cfg)
    with pytest.raises(ConfigError, match=fragment):
        mesh_shape(cfg, 8)


def test_experts_must_divide_expert_axis():
    mesh = build_mesh(MeshConfig(data=2, expert=4))
    check_experts_divide(mesh, 8)
    check_experts_divide(mesh, 4)
    with pytest.raises(ConfigError, match=r"model.n_experts=6 is not divisible by the mesh's expert axis \(4\)"):
        check_experts_divide(mesh, 6)


def test_experts_not_dividing_via_config_and_trainer():
    # Rejected at config load time when the config's own mesh is inconsistent ...
    with pytest.raises(ConfigError, match="n_experts=6 is not divisible by mesh.expert=4"):
        tiny_config("model.n_experts=6", "routing.pool_max=6", "mesh.expert=4", "mesh.data=2")
    small = ("model.n_experts=6", "routing.pool_max=6", "model.n_layers=1", "data.global_batch_size=8",
             "data.seq_len=16")
    # ... by make_sharded_trainer when an explicit mesh does not fit the model ...
    mesh = build_mesh(MeshConfig(data=2, expert=4))
    with pytest.raises(ConfigError, match=r"model.n_experts=6 is not divisible by the mesh's expert axis \(4\)"):
        make_sharded_trainer(tiny_config(*small), mesh=mesh)
    # ... and when the expert axis is the -1 fill (8), which config validation cannot see.
    with pytest.raises(ConfigError, match=r"model.n_experts=6 is not divisible by the mesh's expert axis \(8\)"):
        make_sharded_trainer(tiny_config(*small, "mesh.data=1", "mesh.expert=-1"))


def test_batch_must_divide_batch_axes():
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, expert=2))
    check_batch_divides(mesh, 8)
    check_batch_divides(mesh, 16, 2)
    with pytest.raises(ConfigError, match=r"global_batch_size=12 / train.micro_batches=1 = 12 rows .* 8 batch shards"):
        check_batch_divides(mesh, 12)
    with pytest.raises(ConfigError, match=r"global_batch_size=8 / train.micro_batches=2 = 4 rows .* 8 batch shards"):
        check_batch_divides(mesh, 8, 2)
    with pytest.raises(ConfigError, match="micro_batches=3"):
        check_batch_divides(mesh, 16, 3)
    # Only data x fsdp x expert shard the batch: tensor does not.
    mesh_t = build_mesh(MeshConfig(data=4, tensor=2))
    check_batch_divides(mesh_t, 4)
    with pytest.raises(ConfigError, match="4 batch shards"):
        check_batch_divides(mesh_t, 2)


def test_batch_not_dividing_via_trainer():
    cfg = tiny_config("model.n_layers=1", "data.global_batch_size=4", "data.seq_len=16", "mesh.data=-1")
    with pytest.raises(ConfigError, match="8 batch shards"):
        make_sharded_trainer(cfg)


def test_logical_rules_activations_and_expert_weights():
    rules = list(LOGICAL_RULES)
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P(("data", "fsdp", "expert"), None, None)
    assert nn.logical_to_mesh_axes(("exp", "embed", "mlp"), rules) == P("expert", "fsdp", "tensor")
    assert nn.logical_to_mesh_axes(("exp", "mlp", "embed"), rules) == P("expert", "tensor", "fsdp")
    # Router: model dim FSDP-sharded, routed-expert dim replicated.
    assert nn.logical_to_mesh_axes(("embed", "router_exp"), rules) == P("fsdp", None)
    assert nn.logical_to_mesh_axes(("vocab", "embed"), rules) == P("tensor", "fsdp")


def test_param_shardings_of_sharded_trainer():
    cfg = tiny_config("model.n_layers=1", "model.d_model=32", "model.head_dim=8", "model.expert_hidden=16",
                      "data.global_batch_size=8", "data.seq_len=16", "mesh.data=1", "mesh.fsdp=2",
                      "mesh.expert=2", "mesh.tensor=2")
    tr = make_sharded_trainer(cfg)
    moe = tr.state_shardings.params["layer_0"]["moe"]
    assert moe["w_gate"].spec == P("expert", "fsdp", "tensor")
    assert moe["w_up"].spec == P("expert", "fsdp", "tensor")
    assert moe["w_down"].spec == P("expert", "tensor", "fsdp")
    assert tr.batch_sharding.spec == P(("data", "fsdp", "expert"))


def test_resolve_transport_on_this_backend():
    if compat.has_ragged_all_to_all():
        assert resolve_transport("auto") == "ragged_all_to_all"
        assert resolve_transport("ragged_all_to_all") == "ragged_all_to_all"
    else:
        assert jax.default_backend() == "cpu"
        assert resolve_transport("auto") == "all_to_all"
        with pytest.raises(ValueError, match="ragged_all_to_all is not supported on backend 'cpu'"):
            resolve_transport("ragged_all_to_all")
    assert resolve_transport("all_to_all") == "all_to_all"
    assert resolve_transport("emulated_ragged") == "emulated_ragged"
    with pytest.raises(ValueError, match="unknown expert-parallel transport 'alltoall'"):
        resolve_transport("alltoall")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU fallback only")
def test_cpu_has_no_ragged_all_to_all():
    # XLA:CPU cannot compile ragged_all_to_all: on CPU the check must say so, whether or
    # not this jax has the primitive, and 'auto' must pick the dense exchange.
    assert not compat.has_ragged_all_to_all()
    assert resolve_transport("auto") == "all_to_all"
