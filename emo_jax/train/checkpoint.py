"""Orbax checkpoints of the train state, the data iterator and the config.

One step directory holds three items: `state` (params, optimizer state, step;
sharded arrays), `data` (every process's data iterator position, one JSON file per
process: `data/process_<i>-of-<n>.json`) and `meta` (the config, the base RNG seed and
the process count), plus `integrity.json`: the size and SHA-256 of every file of the
items, written after orbax has finished the files and before it commits the step
directory (so every committed step has one). Restoring verifies it, and checks the
config's model, routing, loss and optimizer sections against the run's; a corrupt
step is moved aside with a warning and the previous good one is used, and when no
step is good the error is one line naming them. A checkpoint written by another number
of processes stops the resume with one line naming both counts: each process's data
position belongs to its own shard of the documents, and shards change with the count.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from emo_jax.config import Config, to_dict
from emo_jax.console import first_line as _first_line
from emo_jax.console import warn as _warn

# Sections that must match to resume; data/train/mesh may change between runs.
MATCHING_SECTIONS = ("model", "routing", "loss", "optimizer")
# Keys of those sections a resume may change (the state does not depend on them): the
# remedies for a diverging run. The change is printed.
MAY_CHANGE_ON_RESUME = ("optimizer.peak_lr", "optimizer.grad_clip")
INTEGRITY_FILE = "integrity.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step directories: <step>.orbax-checkpoint-tmp[-N]
CORRUPT_DIR = "corrupt_checkpoints"  # next to checkpoints/: where corrupt steps are moved


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or restored, with a message naming the problem and the fix."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data_state: dict | None
    meta: dict


# ------------------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _item_files(step_dir: Path) -> list[Path]:
    """The files of the items (state/, data/, meta/), not orbax's top-level step metadata,
    which it rewrites when it commits, nor its commit markers."""
    return sorted(p for p in step_dir.rglob("*")
                  if p.is_file() and p.parent != step_dir and p.name != "commit_success.txt")


def _hash_files(step_dir: Path, files: list[Path]) -> dict[str, dict]:
    # hashlib releases the GIL on large buffers: threads hash files in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_sha256, files))
    return {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}


def write_integrity(step_dir: Path) -> Path:
    """Writes step_dir/integrity.json: the size and SHA-256 of every item file."""
    step_dir = Path(step_dir)
    manifest = {"format": 1, "algorithm": "sha256", "files": _hash_files(step_dir, _item_files(step_dir))}
    target = step_dir / INTEGRITY_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, target)
    return target


def integrity_problem(step_dir: Path) -> str | None:
    """None when every file matches step_dir/integrity.json, else what is wrong (one line).

    A step without the file (written by an older emo_jax) is reported as 'unverified'."""
    step_dir = Path(step_dir)
    path = step_dir / INTEGRITY_FILE
    if not path.is_file():
        return "unverified"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {INTEGRITY_FILE} is unreadable"
    for name, entry in files.items():
        file = step_dir / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {entry['bytes']} were written"
    actual = _hash_files(step_dir, [step_dir / name for name in files])
    for name, entry in files.items():
        if actual[name]["sha256"] != entry["sha256"]:
            return f"{name} does not match the checksum written with it"
    return None


def _nonfinite_leaf(state: Any) -> str | None:
    """The path of the first floating-point array holding NaN/inf, or None."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if hasattr(leaf, "dtype") and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
            if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
                return jax.tree_util.keystr(path)
    return None


_event_loop_noise_filtered = False


def _is_orbax_coroutine(obj: Any) -> bool:
    # `type(...) is`, not isinstance: isinstance reads __class__, which some module proxies
    # (torch's deprecated names) answer with a warning.
    return type(obj) is types.CoroutineType and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename


def _close_unstarted_orbax_coroutines() -> None:
    """At exit, closes the coroutines orbax created but never started.

    When one read of an orbax gather fails, the coroutines made for the other reads are never
    awaited, and the interpreter warns about each one while it tears down ("sys:1: RuntimeWarning:
    coroutine 'Store._get_array_metadatas' was never awaited", after the one-line error; whether
    it does depends on timing). A warnings filter did not stop it once jax was imported (tried: the
    teardown warning no longer consults the list `warnings.filterwarnings` adds to). Closing a
    coroutine that never started runs none of its code."""
    for obj in gc.get_objects():
        if _is_orbax_coroutine(obj) and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
            obj.close()


def _filter_event_loop_noise() -> None:
    """After orbax fails to read or write a checkpoint, tensorstore still completes the
    operations it had started and calls back into orbax's closed asyncio loop: every
    callback raises 'Event loop is closed' into sys.unraisablehook, and asyncio logs
    '(_Gathering)Future exception was never retrieved' (dozens of tracebacks after the real, one-line
    error). The reads orbax had in flight are abandoned: when such a coroutine is collected,
    closing it raises orbax's "Encountered error while reading array index" into the same hook.
    Those, and only those, are dropped; installed when a Checkpointer is made. So are the
    warnings about the coroutines orbax made but never started (`_close_unstarted_orbax_coroutines`)."""
    global _event_loop_noise_filtered
    if _event_loop_noise_filtered:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        if _is_orbax_coroutine(unraisable.object):
            return  # a read abandoned with the failed restore, closed when collected (see above)
        previous(unraisable)

    sys.unraisablehook = hook
    atexit.register(_close_unstarted_orbax_coroutines)
    logging.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in str(record.msg))
    _event_loop_noise_filtered = True


class _HeldOrbaxErrors(logging.Filter):
    """Holds back the ERROR records orbax logs (with tracebacks) from its save threads.

    A failed save is reported once, as a one-line CheckpointError, and the held records
    are dropped; if no save failed they are logged when the checkpointer closes."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            self.held.append(record)
            return False
        return True


def _describe_os_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    for errno_text in ("No space left on device", "Read-only file system", "Permission denied", "Not a directory",
                       "Disk quota exceeded"):
        if errno_text in text:
            return errno_text
    return text[:300]


def prepare_directory(directory: Path, what: str) -> None:
    """Creates `directory` and checks that a file can be written in it (one-line error if not)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        blocker = next((p for p in [directory, *directory.parents] if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker is not None else _describe_os_error(err)
        raise CheckpointError(f"cannot write {what} in {directory}: {reason}; choose a writable "
                              "train.run_dir.") from None


# ------------------------------------------------------------- per-process data state

DATA_ITEM = "data"
_LEGACY_DATA_FILE = "metadata"  # the single JSON file of the data item before per-process files


def _process_index_and_count() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def data_state_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"


def saved_process_counts(data_dir: Path) -> set[int]:
    """The process counts whose data files `data_dir` holds ({1} for a pre-per-process checkpoint)."""
    counts = set()
    for path in Path(data_dir).glob("process_*-of-*.json"):
        count = path.stem.rpartition("-of-")[2]
        if count.isdigit():
            counts.add(int(count))
    if not counts and (Path(data_dir) / _LEGACY_DATA_FILE).is_file():
        counts.add(1)
    return counts


class ProcessDataHandler(ocp.CheckpointHandler):
    """Every process writes and reads its own data iterator state (JSON) in the item's
    directory. orbax's JSON handler writes on process 0 only: every host would resume
    host 0's position, re-reading its documents and skipping its own."""

    def save(self, directory: epath.Path, args: "ProcessDataSave") -> None:
        index, count = _process_index_and_count()
        target = Path(directory) / data_state_file(index, count)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(args.state))
        os.replace(tmp, target)

    def restore(self, directory: epath.Path, args: "ProcessDataRestore | None" = None) -> dict:
        index, count = _process_index_and_count()
        path = Path(directory) / data_state_file(index, count)
        if not path.is_file() and count == 1 and (Path(directory) / _LEGACY_DATA_FILE).is_file():
            path = Path(directory) / _LEGACY_DATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessDataHandler, for_save=True)
@dataclasses.dataclass
class ProcessDataSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(ProcessDataHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataRestore(ocp.args.CheckpointArgs):
    pass


def check_process_count(step_dir: Path, process_count: int) -> None:
    """One-line CheckpointError when `step_dir`'s data positions are another process count's."""
    counts = saved_process_counts(Path(step_dir) / DATA_ITEM)
    if counts and process_count not in counts:
        saved = max(counts)
        raise CheckpointError(f"checkpoint {step_dir} was written by {saved} process(es) but this run has "
                              f"{process_count}: every process resumes its own shard of the data; restart with "
                              f"{saved} processes, or use a new train.run_dir.")


# ------------------------------------------------------------------------ checkpointer


class Checkpointer:
    """Saves asynchronously every `every` steps, keeping the last `keep`."""

    def __init__(self, directory: str | Path, every: int, keep: int, read_only: bool = False):
        """read_only: only restore (no write probe, so a read-only directory works)."""
        self.directory = Path(directory).absolute()
        self.every = every
        self._saving: int | None = None
        self._closed = False
        if jax.process_index() == 0 and not read_only:
            prepare_directory(self.directory, "checkpoints")
        self._held = _HeldOrbaxErrors()
        logging.getLogger("absl").addFilter(self._held)
        _filter_event_loop_noise()  # a failing async save makes that noise in orbax's thread, before we know
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=True,
            async_options=ocp.options.AsyncOptions(post_finalization_callback=self._after_finalize))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def _after_finalize(self) -> None:
        """Runs in orbax's save thread once the items are written, before the commit."""
        if jax.process_index() != 0 or self._saving is None:
            return
        candidates = sorted(self.directory.glob(f"{self._saving}{TMP_SUFFIX}*")) or [self.directory / str(self._saving)]
        write_integrity(candidates[-1])

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: dict | None, config: Config, seed: int,
             force: bool = False) -> bool:
        meta = {"config": to_dict(config), "seed": seed, "step": step,
                "process_count": _process_index_and_count()[1]}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ProcessDataSave(data_state or {}),
                                  meta=ocp.args.JsonSave(meta))
        with self._write_errors(self._saving):
            self.manager.wait_until_finished()  # a failure of the previous (async) save is reported here
        self._saving = step
        with self._write_errors(step):
            return self.manager.save(step, args=args, force=force)

    def _write_errors(self, step: int):
        return _WriteErrors(self, step)

    def _remove_temporary(self) -> None:
        """Orbax's half-written step directories (a save that failed)."""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.glob(f"*{TMP_SUFFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    def restore(self, abstract_state: Any, config: Config, step: int | None = None) -> Restored | None:
        """Restores `step` (default: the latest good one) onto the shardings of `abstract_state`.

        With no step given, a corrupt checkpoint is moved to ../corrupt_checkpoints with a
        warning and the one before it is tried; CheckpointError when none is good."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            return None
        bad: list[tuple[int, str]] = []
        for candidate in steps:
            try:
                restored, problem = self._restore_step(candidate, abstract_state, config)
            except CheckpointError:  # another config: not a corruption, no fallback
                self.close()
                raise
            if restored is not None:
                if bad:
                    self._set_aside(bad, candidate)
                return restored
            bad.append((candidate, problem))
        self.close()
        listed = "; ".join(f"{self.directory}/{s}: {p}" for s, p in bad)
        only = "it" if len(bad) == 1 else "them"
        raise CheckpointError(f"no usable checkpoint, corrupt or unreadable: {listed}. Delete {only} to start "
                              "over, or use a new train.run_dir.")

    def _restore_step(self, step: int, abstract_state: Any, config: Config) -> tuple[Restored | None, str]:
        step_dir = self.directory / str(step)
        problem = integrity_problem(step_dir)
        unverified = problem == "unverified"
        if problem is not None and not unverified:
            return None, problem
        if unverified:
            _warn(f"warning: checkpoint {step_dir} has no {INTEGRITY_FILE} (written by an older emo_jax): "
                  "restoring it unverified")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for unreadable files
            return None, f"meta unreadable: {type(err).__name__}: {_first_line(err)}"
        check_config_matches(meta.get("config", {}), config, step_dir)
        check_process_count(step_dir, _process_index_and_count()[1])
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ProcessDataRestore()))
        except Exception as err:
            return None, f"state unreadable ({type(err).__name__}: {_first_line(err)}); corrupt or from another model"
        leaf = _nonfinite_leaf(restored["state"])
        if leaf is not None:
            return None, f"its state holds NaN/inf values (first in {leaf})"
        data_state = restored["data"] or None
        saved_dataset = meta.get("config", {}).get("data", {}).get("dataset")
        if data_state and saved_dataset is not None and saved_dataset != config.data.dataset:
            _warn(f"data.dataset changed since {step_dir} ({saved_dataset} -> {config.data.dataset}): "
                  f"{config.data.dataset} starts from its first batch")
            data_state = None
        return Restored(step=step, state=restored["state"], data_state=data_state, meta=meta), ""

    def _set_aside(self, bad: list[tuple[int, str]], good: int) -> None:
        """Moves the corrupt steps (newer than `good`) out of checkpoints/, so the run saves them anew."""
        if jax.process_index() == 0:
            target = self.directory.parent / CORRUPT_DIR
            target.mkdir(parents=True, exist_ok=True)
            for step, problem in bad:
                destination = target / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(str(self.directory / str(step)), destination)
                _warn(f"warning: checkpoint {self.directory}/{step} is corrupt ({problem}); moved to "
                      f"{destination}, resuming from step {good}")
        self.manager.reload()

    def wait(self) -> None:
        with self._write_errors(self._saving):
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._write_errors(self._saving):
                self.manager.wait_until_finished()
        finally:
            self.manager.close()
            logger = logging.getLogger("absl")
            logger.removeFilter(self._held)
            for record in self._held.held:  # orbax errors that did not end in a CheckpointError
                logger.handle(record)
            self._held.held.clear()


class _WriteErrors:
    """Turns a failed checkpoint write (full or read-only disk, ...) into a one-line
    CheckpointError and removes orbax's half-written temporary directory."""

    def __init__(self, checkpointer: Checkpointer, step: int | None):
        self.checkpointer, self.step = checkpointer, step

    def __enter__(self):
        return self

    def __exit__(self, exc_type, err, tb):
        # OSError: the file system; ValueError/RuntimeError: what orbax and tensorstore raise for
        # it (e.g. "RESOURCE_EXHAUSTED: ... No space left on device"). Anything else is a bug.
        if err is None or isinstance(err, CheckpointError) or not isinstance(err, (OSError, ValueError, RuntimeError)):
            return False
        self.checkpointer._remove_temporary()
        self.checkpointer._held.held.clear()  # reported below, once
        what = f"checkpoint step {self.step}" if self.step is not None else "a checkpoint"
        raise CheckpointError(f"cannot write {what} to {self.checkpointer.directory}: {_describe_os_error(err)}; "
                              "free space or choose another train.run_dir (earlier checkpoints, if any, "
                              "are intact).") from None


def nonfinite_loss_message(loss: float, step: int, last_checkpoint: int | None, config: Config) -> str:
    """The NaN/inf stop message; `step` is 1-based, as in the logs and checkpoint names."""
    lower = f"optimizer.peak_lr={config.optimizer.peak_lr / 2:g}"
    if last_checkpoint is not None:
        how = (f"rerun the same command with a lower learning rate, e.g. {lower} (peak_lr and grad_clip may "
               f"change on resume): it resumes from the last checkpoint, step {last_checkpoint}")
    else:
        how = f"no checkpoint was saved yet: rerun with a lower learning rate, e.g. {lower}"
    return f"loss is {loss} at step {step}; {how}; or check the data."


def check_config_matches(saved: dict, config: Config, where: Path) -> None:
    current = to_dict(config)
    for section in MATCHING_SECTIONS:
        old, new = saved.get(section, {}), current[section]
        diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        allowed = [k for k in diffs if f"{section}.{k}" in MAY_CHANGE_ON_RESUME]
        for key in allowed:
            _warn(f"{section}.{key} changed since {where}: {old.get(key)!r} -> {new.get(key)!r}")
        diffs = [k for k in diffs if k not in allowed]
        if diffs:
            key = diffs[0]
            raise CheckpointError(f"checkpoint {where} was written with {section}.{key}={old.get(key)!r} but this "
                                  f"run has {section}.{key}={new.get(key)!r} ({len(diffs)} differing key(s) in "
                                  f"'{section}'); use the same config to resume, or a new run_dir.")
