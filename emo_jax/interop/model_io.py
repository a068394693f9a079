"""Loading a model for inference or export from any of the directories emo_jax knows.

  - a Hugging Face checkpoint (config.json + safetensors, OLMoE or EMO layout),
  - a converted model written by `emo-jax convert` (config.yaml + params/, orbax),
  - a training run (run_dir/checkpoints/<step>/ from `emo-jax train`, or a pruned
    model from `emo-jax prune`; only the parameters are restored, not the optimizer
    state), or one step directory of it.

With a mesh, parameters land directly on their NamedShardings
(`parallel.rules.param_shardings`); without, on the default device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
import yaml

from emo_jax.config import Config, _merge, config_from_dict, load_config, parse_overrides, to_dict
from emo_jax.interop.convert import abstract_boxed_params, import_hf
from emo_jax.interop.hf_common import CONFIG_FILE, InteropError

CONFIG_YAML = "config.yaml"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _targets(config: Config, mesh: jax.sharding.Mesh | None) -> dict:
    """ShapeDtypeStructs with the shardings the parameters should be restored onto."""
    boxed = abstract_boxed_params(config)
    abstract = nn.meta.unbox(boxed)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    from emo_jax.parallel.rules import param_shardings
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        param_shardings(boxed, mesh))


def save_converted(directory: str | Path, config: Config, params: dict) -> Path:
    """Writes config.yaml and params/ (orbax, sharded as the arrays are)."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_DIR).exists():
        raise InteropError(f"{directory / PARAMS_DIR} already exists; choose a new output directory or delete it.")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_YAML).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, nn.meta.unbox(params))
    return directory


def copy_tokenizer_files(source: str | Path, out: str | Path) -> list[str]:
    """Copies the tokenizer files a model directory carries, so the converted one is usable alone."""
    import shutil
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(out) / name)
            copied.append(name)
    return copied


def _train_step_dir(path: Path) -> Path | None:
    """The latest step directory of a run dir, its checkpoints/ dir, or a step dir itself."""
    if (path / "state").is_dir() and (path / "meta").is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    steps = [p for p in steps if (p / "state").is_dir()]
    return steps[-1] if steps else None


def _read_config(path: Path, overrides: Sequence[str]) -> tuple[str, Config, Path | None]:
    """(kind, config, train step dir) of a model directory; kind is 'hf', 'converted' or 'train'."""
    if not path.is_dir():
        raise InteropError(f"model directory {path} does not exist; pass a Hugging Face checkpoint, the output "
                           "of `emo-jax convert`, or a training run_dir.")
    if (path / CONFIG_FILE).is_file():
        return "hf", None, None
    if (path / CONFIG_YAML).is_file() and (path / PARAMS_DIR).is_dir():
        return "converted", load_config(path / CONFIG_YAML, list(overrides)), None
    # A training run, or a pruned model (emo-jax prune writes config.yaml + checkpoints/0).
    step_dir = _train_step_dir(path)
    if step_dir is None:
        raise InteropError(f"{path} holds no {CONFIG_FILE} (Hugging Face), {CONFIG_YAML} + {PARAMS_DIR}/ (emo-jax "
                           "convert) or checkpoints/<step>/ (emo-jax train / prune); point at one of those.")
    from emo_jax.train.checkpoint import integrity_problem
    problem = integrity_problem(step_dir)
    if problem not in (None, "unverified"):  # "unverified": written before checkpoints had a manifest
        raise InteropError(f"checkpoint {step_dir} is corrupt ({problem}); point at an earlier step directory "
                           f"(e.g. {step_dir.parent}/<step>).")
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir.absolute() / "meta")
    config = config_from_dict(_merge(meta["config"], parse_overrides(list(overrides))))
    return "train", config, step_dir


def load_model(path: str | Path, mesh: jax.sharding.Mesh | None = None, layout: str | None = None,
               overrides: Sequence[str] = (), mesh_from_config: bool = False) -> tuple[Config, dict]:
    """(config, params) from a Hugging Face, converted or training directory.

    mesh: restore every parameter onto its sharding over this mesh; mesh_from_config:
    build that mesh from the model's config (its `mesh` section, overridable).
    """
    path = Path(path)
    kind, config, step_dir = _read_config(path, overrides)
    if kind == "hf":
        return import_hf(path, layout=layout, mesh=mesh, overrides=overrides, mesh_from_config=mesh_from_config)
    if mesh_from_config:
        from emo_jax.parallel.mesh import build_mesh
        mesh = build_mesh(config.mesh)
    if kind == "converted":
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path.absolute() / PARAMS_DIR, _targets(config, mesh))
        return config, params
    target = {"params": _targets(config, mesh)}
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir.absolute() / "state",
        args=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True))
    return config, restored["params"]
