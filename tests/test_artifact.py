"""emo_jax.artifact: one loader for run directories, emo_jax model folders and Hugging Face
folders; parameters only; sharded restores equal to the unsharded load; one-line errors
that name the file, and nothing written by a failed load or save.

Tiny models (d_model 32, 2 layers, 8 experts); the "pruned" one holds 8 and 5 experts.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from emo_jax import artifact
from emo_jax.compat import make_mesh
from emo_jax.interop import export_hf
from emo_jax.parallel.mesh import MESH_AXES
from helpers import tiny_config
from param_helpers import random_params, save_run_checkpoint

BASE = ("model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.expert_hidden=16",
        "model.vocab_size=96", "model.max_seq_len=64", "data.seq_len=64", "data.global_batch_size=8",
        "kernels.moe_backend=reference", "train.progress_bar=false")
MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1), (1, 1, 8, 1)]


def _config(pruned: bool = False, *extra: str):
    return tiny_config(*BASE, *(("model.layer_experts=[8,5]",) if pruned else ()), *extra)


def _assert_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _write(kind: str, path, config, params):
    """A source of `kind` holding `params`."""
    if kind == "run":
        return save_run_checkpoint(path, config, params, step=3)
    if kind == "model":
        return artifact.save(path, config, params)
    export_hf(params, config, path, layout="emo")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One source of every kind, full and pruned, with the same random parameters per model."""
    root = tmp_path_factory.mktemp("artifact")
    out = {}
    for pruned in (False, True):
        config = _config(pruned)
        params = random_params(config, seed=1 + pruned, std=0.3)
        for kind in artifact.KINDS:
            out[kind, pruned] = (_write(kind, root / f"{kind}_{int(pruned)}", config, params), config, params)
    return out


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("kind", artifact.KINDS)
def test_round_trip(sources, kind, pruned):
    path, config, params = sources[kind, pruned]
    loaded = artifact.load(path)
    assert loaded.source.kind == kind
    assert loaded.config.model.expert_counts == config.model.expert_counts
    if kind != "hf":  # an HF folder carries only the model section (and eos)
        assert loaded.config == config
    _assert_equal(params, loaded.params)
    for leaf in jax.tree.leaves(loaded.params):
        assert leaf.sharding.device_set == {jax.local_devices()[0]}


def test_run_directory_steps(tmp_path):
    config = _config()
    first, second = random_params(config, seed=1), random_params(config, seed=2)
    save_run_checkpoint(tmp_path / "run", config, first, step=100)
    save_run_checkpoint(tmp_path / "run", config, second, step=300)
    assert artifact.load(tmp_path / "run").source.step == 300
    _assert_equal(second, artifact.load(tmp_path / "run").params)
    _assert_equal(first, artifact.load(f"{tmp_path / 'run'}@100").params)
    _assert_equal(first, artifact.load(tmp_path / "run", step=100).params)
    _assert_equal(first, artifact.load(tmp_path / "run" / "checkpoints" / "100").params)
    _assert_equal(first, artifact.load(tmp_path / "run" / "checkpoints", step=100).params)
    with pytest.raises(artifact.ArtifactError, match=r"checkpoints has no step 200 \(it has \[100, 300\]\)"):
        artifact.load(f"{tmp_path / 'run'}@200")


def test_save_writes_parameters_only(tmp_path):
    config = _config()
    path = artifact.save(tmp_path / "m", config, random_params(config))
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "integrity.json", "params"]
    item_names = {k.split("/")[0].split(".")[0] for k in _ocdbt_keys(path / "params")}
    assert item_names == {"embedding", "final_norm", "layer_0", "layer_1", "lm_head"}


# --------------------------------------------------------------------- sharded restore


@pytest.mark.parametrize("kind", artifact.KINDS)
def test_sharded_restore_equals_unsharded(sources, kind):
    path, config, params = sources[kind, False]
    unsharded = artifact.load(path).params
    for shape in MESHES:
        mesh = make_mesh(shape, MESH_AXES)
        sharded = artifact.load(path, mesh=mesh).params
        expected = artifact.abstract_params(config, mesh)
        for (key, leaf), target in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(expected)):
            assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim), (shape, jax.tree_util.keystr(key))
        _assert_equal(unsharded, sharded)
    w_up = sharded["layer_0"]["moe"]["w_up"]  # the last mesh: 8-way expert parallel
    assert w_up.addressable_shards[0].data.shape == (1, 32, 16)


def test_mesh_from_the_config(sources):
    path, config, params = sources["model", False]
    loaded = artifact.load(path, mesh="config", overrides=["mesh.data=2", "mesh.expert=4"])
    assert dict(loaded.params["layer_1"]["moe"]["w_gate"].sharding.mesh.shape)["expert"] == 4
    _assert_equal(params, loaded.params)


# --------------------------------------------------------------------- parameters only


def _ocdbt_keys(item_dir) -> list[str]:
    import tensorstore as ts
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item_dir}"}).result()
    return [k.decode() for k in kv.list().result()]


def test_optimizer_state_is_never_read(tmp_path):
    """The Adam moments are deleted from the run's state store: loading still works."""
    import tensorstore as ts
    from emo_jax.train.checkpoint import write_integrity
    config = _config()
    params = random_params(config, seed=4)
    save_run_checkpoint(tmp_path / "run", config, params, step=3)
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    state = step_dir / "state"
    keys = _ocdbt_keys(state)
    assert any(k.startswith("opt_state.") for k in keys)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}"}).result()
    kv.delete_range(ts.KvStore.KeyRange("opt_state.", "opt_state/")).result()  # every key "opt_state.*"
    assert not any(k.startswith("opt_state.") for k in _ocdbt_keys(state))
    write_integrity(step_dir)  # the step is consistent again, only without its optimizer state
    _assert_equal(params, artifact.load(tmp_path / "run").params)
    # The full restore (what resuming training does) now fails: the state really is gone.
    from emo_jax.train.checkpoint import Checkpointer
    from emo_jax.train.sharded import make_sharded_trainer
    trainer = make_sharded_trainer(config)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", every=0, keep=10, read_only=True)
    with pytest.raises(Exception):
        checkpointer._restore_step(3, trainer.abstract_state, config)[0].state.opt_state  # noqa: B018
    checkpointer.close()


# ----------------------------------------------------------------------------- errors


def _tree_snapshot(path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_missing_folder_and_wrong_kinds(tmp_path, sources):
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(tmp_path / "nowhere")
    assert "nowhere: no such directory" in _one_line(err)
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(tmp_path / "config.yaml")
    assert "config.yaml is a file, not a model directory" in _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(tmp_path / "empty")
    assert "empty holds no config.json, no config.yaml + params/ and no checkpoints/<step>/" in _one_line(err)
    model_dir = sources["model", False][0]
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(f"{model_dir}@3")
    assert "applies only to training run directories" in _one_line(err)
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(model_dir, overrides=["model.d_model=64"])
    assert "model.d_model changes the parameter shapes" in _one_line(err)
    assert artifact.load(model_dir, overrides=["routing.eval_pool=fixed", "routing.eval_pool_size=5"]) \
        .config.routing.eval_pool_size == 5


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("kind", ["run", "model"])
@pytest.mark.parametrize("manifest", [True, False])
def test_truncated_files_are_one_line_errors_and_nothing_is_written(tmp_path, sources, kind, manifest):
    source = tmp_path / kind
    shutil.copytree(sources[kind, False][0], source)
    step_or_folder = source / "checkpoints" / "3" if kind == "run" else source
    if not manifest:  # written before emo_jax wrote manifests: only orbax can notice
        (step_or_folder / "integrity.json").unlink()
    victim = _largest_file(step_or_folder / ("state" if kind == "run" else "params"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    before = _tree_snapshot(tmp_path)
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(source)
    text = _one_line(err)
    if manifest:
        assert f"{step_or_folder} is corrupt: {victim.relative_to(step_or_folder)} has" in text
    else:
        assert "is unreadable" in text and str(step_or_folder) in text
    assert _tree_snapshot(tmp_path) == before  # nothing moved aside, nothing written


def test_truncated_safetensors_is_a_one_line_error(tmp_path, sources):
    source = tmp_path / "hf"
    shutil.copytree(sources["hf", False][0], source)
    victim = source / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(Exception) as err:
        artifact.load(source)
    assert "model.safetensors is truncated" in _one_line(err) and "re-download or re-export it" in _one_line(err)


def test_a_corrupt_config_yaml_names_the_file(tmp_path, sources):
    source = tmp_path / "m"
    shutil.copytree(sources["model", False][0], source)
    (source / "config.yaml").write_text("model: {top_k: 99}\n")
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(source)
    assert str(source / "config.yaml") in _one_line(err) and "top_k" in _one_line(err)


def test_save_refuses_and_leaves_nothing_partial(tmp_path, monkeypatch):
    config = _config()
    params = random_params(config)
    with pytest.raises(artifact.ArtifactError, match="do not have the shapes of config"):
        artifact.save(tmp_path / "bad", _config(True), params)
    artifact.save(tmp_path / "ok", config, params)
    with pytest.raises(artifact.ArtifactError, match="already exists and is not an empty folder"):
        artifact.save(tmp_path / "ok", config, params)
    from emo_jax.train import checkpoint

    def disk_full(_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_integrity", disk_full)
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.save(tmp_path / "full_disk", config, params)
    assert "cannot write" in _one_line(err) and "No space left on device" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no partial folder left


# -------------------------------------------------------------------- train.init_from


@pytest.mark.parametrize("kind", artifact.KINDS)
def test_train_initialises_from_every_source_kind(sources, tmp_path, kind):
    from emo_jax.config import replace, to_dict
    from emo_jax.train.sharded import make_sharded_trainer
    path, _, params = sources[kind, True]
    model_config = artifact.read_config(path)[0]
    config = replace(_config(True), model=to_dict(model_config)["model"],
                     train={"init_from": str(path), "run_dir": str(tmp_path / "ft")})
    trainer = make_sharded_trainer(config)
    state = trainer.init_state(jax.random.PRNGKey(0))
    assert int(state.step) == 0
    _assert_equal(params, state.params)
    for leaf, target in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainer.state_shardings.params)):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and all(not np.any(np.asarray(x)) for x in moments)  # a fresh optimizer


def test_init_from_a_different_model_is_a_one_line_error(sources, tmp_path):
    from emo_jax.config import replace
    from emo_jax.train.sharded import make_sharded_trainer
    config = replace(_config(False, "model.d_model=64"),
                     train={"init_from": str(sources["model", False][0]), "run_dir": str(tmp_path / "ft")})
    with pytest.raises(artifact.ArtifactError) as err:
        make_sharded_trainer(config).init_state(jax.random.PRNGKey(0))
    assert "its model.d_model=32 but this config has model.d_model=64" in _one_line(err)


# ------------------------------------------------------------------ the CLI, every kind


def _cli(*args: str) -> int:
    from emo_jax.cli import main
    return main([str(a) for a in args])


@pytest.mark.parametrize("kind", artifact.KINDS)
def test_generate_convert_memory_params_on_every_kind(sources, tmp_path, capsys, kind):
    path, config, params = sources[kind, True]
    shown = f"{path}@3" if kind == "run" else path
    assert _cli("generate", shown, "--prompt-ids", "1 2 3", "--max-new-tokens", "3", "--eos-id", "0",
                "kernels.moe_backend=reference") == 0
    assert len(capsys.readouterr().out.strip().split()) >= 4
    assert _cli("convert", shown, tmp_path / "folder", "--to", "emo_jax") == 0
    _assert_equal(params, artifact.load(tmp_path / "folder").params)
    assert _cli("convert", shown, tmp_path / "hf", "--to", "emo") == 0
    _assert_equal(params, artifact.load(tmp_path / "hf").params)
    capsys.readouterr()
    assert _cli("memory", shown, "--batch", "1", "--seq-len", "16") == 0
    table = capsys.readouterr().out
    assert "| 8 |" in table and "| 5 |" in table  # the full width and the pruned count
    assert _cli("params", shown) == 0
    assert "total" in capsys.readouterr().out
    assert _cli("generate", tmp_path / "nowhere", "--prompt-ids", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere: no such directory" in err
