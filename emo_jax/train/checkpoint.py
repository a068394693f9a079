"""Orbax checkpoints of the train state, the data iterator and the config.

One step directory holds three items: `state` (params, optimizer state, step;
sharded arrays), `data` (the data iterator's JSON state) and `meta` (the config and
the base RNG seed). Restoring checks the config's model, routing and optimizer
sections against the run's and fails with one line when they differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from emo_jax.config import Config, to_dict

# Sections that must match to resume; data/train/mesh may change between runs.
MATCHING_SECTIONS = ("model", "routing", "loss", "optimizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored, with a message naming the problem and the fix."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: dict | None
    meta: dict


class Checkpointer:
    """Saves asynchronously every `every` steps, keeping the last `keep`."""

    def __init__(self, directory: str | Path, every: int, keep: int):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: dict | None, config: Config, seed: int,
             force: bool = False) -> bool:
        meta = {"config": to_dict(config), "seed": seed, "step": step}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, config: Config, step: int | None = None) -> Restored | None:
        """Restores `step` (default: the latest) onto the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({type(err).__name__}: "
                                  f"{_first_line(err)}); delete that step directory to fall back to an "
                                  "earlier one, or start a new run_dir.") from None
        check_config_matches(meta.get("config", {}), config, self.directory / str(step))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as err:
            raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored ({type(err).__name__}: "
                                  f"{_first_line(err)}); it is corrupt or from another model. Delete it or "
                                  "use a new run_dir.") from None
        return Restored(step=step, state=restored["state"], data_state=restored["data"] or None, meta=meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def check_config_matches(saved: dict, config: Config, where: Path) -> None:
    current = to_dict(config)
    for section in MATCHING_SECTIONS:
        old, new = saved.get(section, {}), current[section]
        diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diffs:
            key = diffs[0]
            raise CheckpointError(f"checkpoint {where} was written with {section}.{key}={old.get(key)!r} but this "
                                  f"run has {section}.{key}={new.get(key)!r} ({len(diffs)} differing key(s) in "
                                  f"'{section}'); use the same config to resume, or a new run_dir.")


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for a state like `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
