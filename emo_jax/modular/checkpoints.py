"""Loading a trained (or pruned) model from its run directory, saving a pruned one.

A pruned model is saved exactly like a trained one: `run_dir/checkpoints/0` written by
`train.checkpoint.Checkpointer` (params, a freshly initialised optimizer state, step 0,
the config in the metadata), plus `run_dir/config.yaml` so that
`emo-jax train --config run_dir/config.yaml` fine-tunes it and `emo-jax eval` /
`generate` load it like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import yaml

from emo_jax.config import Config, config_from_dict, to_dict
from emo_jax.modular import ModularError

PRUNED_STEP = 0


def checkpoint_dir(path: str | Path) -> Path:
    """run_dir or run_dir/checkpoints -> the orbax checkpoints directory (which must exist)."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate.absolute()
    raise ModularError(f"no checkpoint under {path}: pass the run_dir of a model trained with "
                       "`emo-jax train` (it holds checkpoints/<step>) or of one written by `emo-jax prune`.")


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_config(path: str | Path, step: int | None = None) -> tuple[Config, int]:
    """The config stored with a checkpoint (its metadata) and the step read."""
    import orbax.checkpoint as ocp
    directory = checkpoint_dir(path)
    steps = _steps(directory)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ModularError(f"{directory} has no step {step} (have {steps}); pass one of those to --step.")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # orbax raises many types for unreadable files
        raise ModularError(f"checkpoint {directory}/{step} is unreadable ({type(err).__name__}); "
                           "delete it or pass another --step.") from None
    finally:
        manager.close()
    return config_from_dict(meta["config"]), step


def _abstract_state(config: Config):
    """The TrainState restore target, on the first local device."""
    from emo_jax.model import build_model
    from emo_jax.train import init_train_state, make_optimizer
    model = build_model(config)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    abstract = jax.eval_shape(lambda k: init_train_state(model, optimizer, config, k), jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def load_model(path: str | Path, step: int | None = None) -> tuple[Config, Any, int]:
    """(config, params, step) of the checkpoint at `path` (default: its latest step)."""
    from emo_jax.train.checkpoint import CheckpointError, Checkpointer
    config, step = read_config(path, step)
    checkpointer = Checkpointer(checkpoint_dir(path), every=0, keep=1_000_000, read_only=True)
    try:
        restored = checkpointer.restore(_abstract_state(config), config, step)
    except CheckpointError as err:
        raise ModularError(str(err)) from None
    finally:
        checkpointer.close()
    return config, restored.state.params, step


def write_config_yaml(config: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


def save_model(run_dir: str | Path, config: Config, params: Any, seed: int = 0) -> Path:
    """Saves params (+ fresh optimizer state, step 0) as run_dir/checkpoints/0 and
    run_dir/config.yaml; refuses a run_dir that already holds checkpoints."""
    import jax.numpy as jnp

    from emo_jax.train import make_optimizer
    from emo_jax.train.checkpoint import Checkpointer
    from emo_jax.train.step import TrainState
    run_dir = Path(run_dir).absolute()
    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
        raise ModularError(f"{run_dir} already holds checkpoints; pass a new output directory (--out).")
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    checkpointer = Checkpointer(ckpt, every=0, keep=1)
    try:
        checkpointer.save(PRUNED_STEP, state, None, config, seed, force=True)
    finally:
        checkpointer.close()
    write_config_yaml(config, run_dir / "config.yaml")
    return run_dir
