"""Model artifacts: the one place that builds abstract parameters, loads and saves models.

Three kinds of source (docs/model_artifacts.md):

  run    a training run directory written by `emo-jax train`: RUN_DIR/checkpoints/<step>/
         (state/, data/, meta/, integrity.json). `RUN_DIR` is its latest step,
         `RUN_DIR@300` (or `step=300`, or the step directory itself) a given one. Only
         the parameters are read from `state/`: the optimizer moments are never restored.
  model  an emo_jax model folder written by `save` (`emo-jax convert --to emo_jax`,
         `emo-jax prune`): config.yaml + params/ (orbax) + integrity.json.
  hf     a Hugging Face folder: config.json + *.safetensors in the OLMoE or EMO layout,
         full or pruned.

`load(source, mesh)` restores every parameter directly onto its NamedSharding over
`mesh` (orbax restore with sharded abstract targets; for safetensors, each device shard
reads only its rectangle), so no host or device ever holds the whole model.
Errors are one-line `ArtifactError`s (an `InteropError`) naming the file and the
problem; loading never writes, and `save` writes into a temporary folder that is
renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import yaml

from emo_jax.config import Config, ConfigError, config_from_dict, parse_overrides, replace, to_dict
from emo_jax.console import first_line as _first_line
from emo_jax.console import warn as _warn
from emo_jax.interop.hf_common import CONFIG_FILE as HF_CONFIG_FILE
from emo_jax.interop.hf_common import InteropError

CONFIG_YAML = "config.yaml"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
KINDS = ("run", "model", "hf")
_AT_STEP = re.compile(r"^(.*)@(\d+)$")
_WHAT = ("a training run directory (RUN_DIR or RUN_DIR@STEP), an emo_jax model folder (config.yaml + params/) "
         "or a Hugging Face folder (config.json + *.safetensors)")


class ArtifactError(InteropError):
    """A model source that cannot be read or a folder that cannot be written: one line, naming the file."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a model comes from, resolved without reading any parameter."""

    kind: str  # "run" | "model" | "hf"
    path: Path  # the run directory, model folder or HF folder
    step: int | None = None  # run: the step read
    step_dir: Path | None = None  # run: path/checkpoints/<step>

    def describe(self) -> str:
        return f"{self.path} step {self.step}" if self.kind == "run" else f"{self.path} ({self.kind})"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: Config
    params: dict  # unboxed arrays, on the mesh's shardings (or the first local device)
    source: Source


# ------------------------------------------------------------------ abstract parameters


def boxed_abstract_params(config: Config) -> dict:
    """nn.Partitioned ShapeDtypeStructs of the parameters (logical axis names kept); nothing allocated."""
    from emo_jax.model import build_model
    model = build_model(config)
    tokens = jax.ShapeDtypeStruct((1, min(8, config.model.max_seq_len)), jnp.int32)
    variables = jax.eval_shape(
        lambda key, tok: model.init({"params": key, "routing": key}, tok, train=False),
        jax.random.PRNGKey(0), tokens)
    return variables["params"]


def abstract_params(config: Config, mesh: jax.sharding.Mesh | None = None) -> dict:
    """ShapeDtypeStructs of the (unboxed) parameters; with `mesh`, each carries its NamedSharding."""
    boxed = boxed_abstract_params(config)
    abstract = nn.meta.unbox(boxed)
    if mesh is None:
        return abstract
    from emo_jax.parallel.rules import param_shardings as from_boxed
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        from_boxed(boxed, mesh))


def _restore_targets(config: Config, mesh: jax.sharding.Mesh | None) -> dict:
    """abstract_params with a sharding on every leaf (the first local device without a mesh)."""
    if mesh is not None:
        return abstract_params(config, mesh)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params(config))


# -------------------------------------------------------------------------- resolving


def _split_step(source: str | Path, step: int | None) -> tuple[Path, int | None]:
    """'runs/x@300' -> (runs/x, 300), unless a path with that name exists."""
    text = str(source)
    match = _AT_STEP.match(text)
    if match and not Path(text).exists():
        at = int(match.group(2))
        if step is not None and step != at:
            raise ArtifactError(f"{text}: step {at} in the name but step={step} given; give the step once.")
        return Path(match.group(1)), at
    return Path(text), step


def _step_dirs(checkpoints: Path) -> dict[int, Path]:
    """Committed orbax step directories (orbax's temporary ones carry a suffix and are skipped)."""
    return {int(p.name): p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()}


def resolve(source: str | Path, step: int | None = None) -> Source:
    """The kind of `source` and, for a run, the step directory to read (latest by default)."""
    path, step = _split_step(source, step)
    if not path.exists():
        raise ArtifactError(f"{path}: no such directory; pass {_WHAT}.")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not a model directory; pass {_WHAT}.")
    if (path / HF_CONFIG_FILE).is_file():
        kind = "hf"
    elif (path / CONFIG_YAML).is_file() and (path / PARAMS_DIR).is_dir():
        kind = "model"
    else:
        kind = "run"
    if kind != "run":
        if step is not None:
            raise ArtifactError(f"{path} is a{'n' if kind == 'hf' else ''} {kind} folder with one set of "
                                f"parameters; a step (@{step}) applies only to training run directories.")
        return Source(kind, path)
    if (path / "state").is_dir() and (path / "meta").is_dir() and path.name.isdigit():  # a step directory
        if step is not None and step != int(path.name):
            raise ArtifactError(f"{path} is the step directory of step {path.name}, not {step}.")
        return Source("run", path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent,
                      int(path.name), path)
    checkpoints = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = _step_dirs(checkpoints)
    if not steps:
        raise ArtifactError(f"{path} holds no {HF_CONFIG_FILE}, no {CONFIG_YAML} + {PARAMS_DIR}/ and no "
                            f"{CHECKPOINTS_DIR}/<step>/; pass {_WHAT}.")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ArtifactError(f"{checkpoints} has no step {step} (it has {sorted(steps)}); pass one of those.")
    run_dir = path if checkpoints != path else (path.parent if path.name == CHECKPOINTS_DIR else path)
    return Source("run", run_dir, step, steps[step])


# ---------------------------------------------------------------------------- configs


def _apply_overrides(config: Config, overrides: Sequence[str], where: Path) -> Config:
    if not overrides:
        return config
    try:
        return replace(config, **parse_overrides(list(overrides)))
    except ConfigError as err:
        raise ArtifactError(f"{where}: {err}") from None


def _check_same_shapes(stored: Config, config: Config, where: Path) -> None:
    """Overrides may change anything but the parameter shapes (those are fixed by the file)."""
    if stored.model == config.model:
        return
    if _shape_mismatch(abstract_params(stored), abstract_params(config)) is not None:
        old_model = to_dict(stored)["model"]
        keys = ", ".join(f"model.{k}" for k, v in to_dict(config)["model"].items() if old_model[k] != v)
        raise ArtifactError(f"{where}: the override of {keys} changes the parameter shapes stored there; "
                            "only shape-preserving model keys (e.g. model.dtype, model.remat) may be overridden.")


def _integrity(step_or_folder: Path) -> None:
    from emo_jax.train.checkpoint import INTEGRITY_FILE, integrity_problem
    problem = integrity_problem(step_or_folder)
    if problem == "unverified":
        _warn(f"warning: {step_or_folder} has no {INTEGRITY_FILE} (written by an older emo_jax): read unverified")
    elif problem is not None:
        raise ArtifactError(f"{step_or_folder} is corrupt: {problem}.")


def _run_meta(src: Source) -> dict:
    import orbax.checkpoint as ocp
    from emo_jax.train.checkpoint import _filter_event_loop_noise
    _filter_event_loop_noise()
    meta_dir = src.step_dir.absolute() / "meta"
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    except Exception as err:  # orbax raises many types for unreadable files
        raise ArtifactError(f"{meta_dir} is unreadable ({type(err).__name__}: {_first_line(err)}); "
                            f"load another step ({src.path}@STEP).") from None


def read_config(source: str | Path, overrides: Sequence[str] = (), step: int | None = None,
                layout: str | None = None) -> tuple[Config, Source]:
    """The config of a model source (no parameter is read), with dotted `overrides` applied."""
    config, stored, src = _read_config(source, overrides, step, layout)
    return config, src


def _read_config(source, overrides, step, layout) -> tuple[Config, Config, Source]:
    src = resolve(source, step)
    if src.kind == "hf":
        from emo_jax.interop import convert
        from emo_jax.interop.hf_common import read_hf_config
        hf = read_hf_config(src.path)
        config = convert.config_from_hf(hf, convert.detect_layout(hf, layout), overrides,
                                        name=src.path.absolute().name or "converted")
        return config, config, src
    if src.kind == "model":
        where = src.path / CONFIG_YAML
        try:
            stored = config_from_dict(yaml.safe_load(where.read_text()) or {})
        except (ConfigError, yaml.YAMLError) as err:
            raise ArtifactError(f"{where}: {' '.join(str(err).split())}") from None
    else:
        where = src.step_dir / "meta"
        try:
            stored = config_from_dict(_run_meta(src)["config"])
        except (ConfigError, KeyError, TypeError) as err:
            raise ArtifactError(f"{where}: not an emo_jax config ({err})") from None
    config = _apply_overrides(stored, overrides, where)
    return config, stored, src


# ---------------------------------------------------------------------------- loading


def load(source: str | Path, mesh: jax.sharding.Mesh | str | None = None, overrides: Sequence[str] = (),
         step: int | None = None, layout: str | None = None) -> LoadedModel:
    """Config and parameters of a run directory, an emo_jax model folder or a Hugging Face folder.

    mesh: a Mesh (every parameter restored onto its sharding there), None (the first local
    device), or "config" (a mesh built from the model's `mesh` section, overridable, e.g.
    mesh.expert=8). overrides: dotted key=value strings applied to the stored config (a
    model key only when it keeps the parameter shapes). step: a run's step (or RUN_DIR@STEP).
    layout: "olmoe" / "emo" forces the layout of a Hugging Face folder (default: detected).
    """
    config, stored, src = _read_config(source, overrides, step, layout)
    if isinstance(mesh, str):
        if mesh != "config":
            raise ArtifactError(f"mesh={mesh!r}: pass a jax Mesh, None or 'config'.")
        from emo_jax.parallel.mesh import build_mesh
        mesh = build_mesh(config.mesh)
    if src.kind == "hf":
        params = _load_hf(src, config, mesh, layout)
    else:
        _check_same_shapes(stored, config, src.step_dir or src.path)
        _integrity(src.step_dir if src.kind == "run" else src.path)
        params = _restore_orbax(src, config, mesh)
    from emo_jax.train.checkpoint import _nonfinite_leaf
    leaf = _nonfinite_leaf(params)
    if leaf is not None:
        raise ArtifactError(f"{src.step_dir or src.path}: the parameters hold NaN/inf values (first in {leaf}).")
    return LoadedModel(config, params, src)


def _load_hf(src: Source, config: Config, mesh, layout: str | None) -> dict:
    from emo_jax.interop import convert
    from emo_jax.interop.hf_common import read_hf_config
    from emo_jax.interop.safetensors_io import SafetensorsReader
    module = convert.detect_layout(read_hf_config(src.path), layout)
    reader = SafetensorsReader(src.path)
    sources = module.sources(config.model, config.model.expert_counts)
    convert.check_tensors(reader, sources, module.NAME)
    return convert.load_params(reader, sources, boxed_abstract_params(config), mesh)


def _restore_orbax(src: Source, config: Config, mesh) -> dict:
    """Parameters only: a run's `state` item is restored partially (its `params` subtree)."""
    import orbax.checkpoint as ocp
    from emo_jax.train.checkpoint import _filter_event_loop_noise
    _filter_event_loop_noise()
    targets = _restore_targets(config, mesh)
    if src.kind == "model":
        where = src.path.absolute() / PARAMS_DIR
        item = targets
    else:
        where = src.step_dir.absolute() / "state"
        item = {"params": targets}
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)  # each leaf onto its sharding
        restored = ocp.PyTreeCheckpointer().restore(
            where, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    except Exception as err:  # orbax/tensorstore raise many types for unreadable or mismatched files
        raise ArtifactError(f"{where} is unreadable ({type(err).__name__}: {_first_line(err)}); it is corrupt "
                            "or holds another model than its config describes.") from None
    params = restored if src.kind == "model" else restored["params"]
    _check_restored(params, targets, where)
    return params


def _shape_mismatch(got: dict, want: dict) -> tuple[str, list, list] | str | None:
    """None when the two trees have the same structure and leaf shapes; "tree" when the
    structures differ; else (path, got shape, wanted shape) of the first leaf that differs."""
    if jax.tree.structure(got) != jax.tree.structure(want):
        return "tree"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        if tuple(a.shape) != tuple(b.shape):
            return jax.tree_util.keystr(path), list(a.shape), list(b.shape)
    return None


def _check_restored(params: dict, targets: dict, where: Path) -> None:
    mismatch = _shape_mismatch(params, targets)
    if mismatch == "tree":
        raise ArtifactError(f"{where}: its parameter tree differs from the one its config describes.")
    if mismatch is not None:
        path, got, want = mismatch
        raise ArtifactError(f"{where}: parameter {path} is {got}, its config implies {want}.")


# ----------------------------------------------------------------------------- saving


def save(directory: str | Path, config: Config, params: dict) -> Path:
    """Writes an emo_jax model folder: config.yaml, params/ (orbax, sharded as the arrays are) and
    integrity.json. Refuses an existing non-empty folder; a failure leaves nothing behind (the
    folder is written as .NAME.partial next to it and renamed when complete).

    Only parameters are written: fine-tune a saved model with train.init_from=DIRECTORY.
    """
    from emo_jax.train.checkpoint import write_integrity
    import orbax.checkpoint as ocp
    directory = Path(directory).absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ArtifactError(f"{directory} already exists and is not an empty folder; choose a new output "
                            "directory or delete it.")
    params = nn.meta.unbox(params)
    expected = abstract_params(config)
    if _shape_mismatch(params, expected) is not None:
        raise ArtifactError(f"{directory}: the parameters do not have the shapes of config '{config.name}' "
                            "(model section); save them with the config they were made with.")
    partial = directory.parent / f".{directory.name}.partial"  # the same name on every host
    try:
        if jax.process_index() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            (partial / CONFIG_YAML).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        _sync_hosts("emo_jax.artifact.save.start")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(partial / PARAMS_DIR, params)
        _sync_hosts("emo_jax.artifact.save.written")
        if jax.process_index() == 0:
            write_integrity(partial)
            if directory.exists():
                directory.rmdir()  # empty (checked above)
            os.replace(partial, directory)
        _sync_hosts("emo_jax.artifact.save.renamed")
    except BaseException as err:
        if jax.process_index() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError):
            raise ArtifactError(f"cannot write {directory}: {' '.join(str(err).split())}") from None
        raise
    return directory


def _sync_hosts(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def copy_tokenizer_files(source: str | Path, out: str | Path) -> list[str]:
    """Copies the tokenizer files a model folder carries, so the written one is usable alone."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(out) / name)
            copied.append(name)
    return copied
