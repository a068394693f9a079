"""Multi-host pieces that run in one process (the two-process run: test_multiprocess.py).

Bad launches are one-line errors and never hangs (unreachable coordinator, processes that
never arrive, half-set environment, a mesh that does not split the batch over the
processes, a checkpoint of another process count); the per-process data state; the
cross-process agreement's device path; Ctrl-C saves and stops like SIGTERM; the loop
reads step t's metrics after dispatching step t+1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emo_jax.config import load_config
from emo_jax.parallel import distributed
from emo_jax.parallel.agreement import Agreement, check_same_everywhere
from emo_jax.train import checkpoint as ckpt
from emo_jax.train import stops

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT),
               **extra)
    return env


def _train_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "emo_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"train.run_dir={run_dir}", "train.steps=2", "train.progress_bar=false"]


# ------------------------------------------------------------------ bad launches


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    done = subprocess.run(_train_command(tmp_path / "run"), cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_cli_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
                                       EMO_JAX_INIT_TIMEOUT="2"))
    assert done.returncode == 1
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err[-3000:]
    assert f"the coordinator {address} did not answer within 2 s" in err, err
    assert time.monotonic() - start < 60


def test_processes_that_never_arrive_end_with_one_line_after_the_timeout(tmp_path):
    """Process 0 of 2 starts the coordinator and waits for process 1, which never comes:
    jax would abort with a C++ stack trace after its own timeout; the watchdog exits first."""
    code = ("from emo_jax.parallel import distributed; "
            f"distributed.initialize('127.0.0.1:{_closed_port()}', 2, 0, timeout_s=3)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=_cli_env())
    assert done.returncode == distributed.INIT_FAILED_EXIT, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("DistributedError: the 2 processes did not all join"), done.stderr[-3000:]
    assert "Check failure" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "set but not JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "is not HOST:PORT"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "process id 2 is not in [0, 2)"),
])
def test_bad_launch_environment_is_a_one_line_error(monkeypatch, env, message):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "EMO_JAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.DistributedError) as info:
        distributed.maybe_initialize_distributed()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_mesh_that_does_not_split_the_batch_over_the_processes_is_refused():
    from emo_jax.parallel import mesh as mesh_lib, rules
    from emo_jax.config import MeshConfig
    mesh = mesh_lib.build_mesh(MeshConfig(data=2, fsdp=1, expert=4, tensor=1))
    sharding = rules.batch_sharding(mesh)
    distributed.check_processes_fit_mesh(mesh, sharding, 16, 32)  # one process: all rows are its own
    assert distributed.process_batch_rows(mesh, sharding, 16, 32) == 16
    # Seen as one of 2 processes, this process's devices would hold all 16 rows, not 8.
    with pytest.raises(distributed.DistributedError, match=r"hold 16 of 16 rows, 8 expected"):
        distributed.check_processes_fit_mesh(mesh, sharding, 16, 32, process_count=2)
    with pytest.raises(distributed.DistributedError, match=r"global_batch_size=16 does not divide over the 3"):
        distributed.check_processes_fit_mesh(mesh, sharding, 16, 32, process_count=3)


# ------------------------------------------------------------------ agreement, signals


def test_agreement_device_path_takes_the_max():
    agreement = Agreement(3, force_collective=True)  # the all-reduce a multi-process run uses
    assert agreement.collective
    handle = agreement.start([1, 0, 7])
    np.testing.assert_array_equal(agreement.result(handle), [1, 0, 7])
    check_same_everywhere({"a": 3, "b": -5}, Agreement(4, force_collective=True))
    local = Agreement(2)  # one process: nothing dispatched
    assert not local.collective and list(local([4, 2])) == [4, 2]


def test_sigterm_and_ctrl_c_set_the_stop_flag_and_a_second_ctrl_c_raises():
    with stops.StopSignals() as signals:
        assert signals.flags() == [0]
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.agreed_signal(signals.flags()) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a stop like SIGTERM (already set)
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # the handler itself: a real signal could land in a gc callback
            signals._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGTERM) is not signals._handle  # restored
    assert stops.signal_name(signal.SIGINT) == "SIGINT"


# ------------------------------------------------------------------ per-process data state


def test_each_process_saves_and_restores_its_own_data_state(tmp_path, monkeypatch):
    handler = ckpt.ProcessDataHandler()
    directory = tmp_path / "data"
    directory.mkdir()
    for index in range(2):
        monkeypatch.setattr(ckpt, "_process_index_and_count", lambda i=index: (i, 2))
        handler.save(directory, ckpt.ProcessDataSave({"position": 10 + index}))
    assert sorted(p.name for p in directory.iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
    for index in range(2):
        monkeypatch.setattr(ckpt, "_process_index_and_count", lambda i=index: (i, 2))
        assert handler.restore(directory, ckpt.ProcessDataRestore()) == {"position": 10 + index}
    assert ckpt.saved_process_counts(directory) == {2}
    ckpt.check_process_count(tmp_path, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 process\(es\) but this run has 4: .*restart "
                                                   r"with 2 processes"):
        ckpt.check_process_count(tmp_path, 4)


def test_a_single_json_data_state_of_older_checkpoints_restores_in_one_process(tmp_path, monkeypatch):
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "metadata").write_text(json.dumps({"index": 5}))  # orbax's JsonSave file
    monkeypatch.setattr(ckpt, "_process_index_and_count", lambda: (0, 1))
    assert ckpt.saved_process_counts(directory) == {1}
    assert ckpt.ProcessDataHandler().restore(directory) == {"index": 5}
    with pytest.raises(ckpt.CheckpointError, match="written by 1 process"):
        ckpt.check_process_count(tmp_path, 2)


# ------------------------------------------------------------------ the loop


def _config(run_dir: Path, *extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"train.run_dir={run_dir}", "train.steps=6", "train.checkpoint_every=0", "train.log_every=3",
        "train.progress_bar=false", "train.eval_every=0", "data.global_batch_size=8", *extra])


def test_ctrl_c_saves_the_agreed_step_and_the_resume_continues_the_trajectory(tmp_path, monkeypatch):
    from emo_jax.train import loop
    events: list[tuple[str, int]] = []
    dispatch, record = loop.dispatch_step, loop.MetricsLog.record

    def dispatch_step(run):
        events.append(("dispatch", run.step + 1))
        if interrupt_at is not None and run.step + 1 == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return dispatch(run)

    def record_metrics(self, step, step_metrics, last_checkpoint):
        events.append(("read", step))
        return record(self, step, step_metrics, last_checkpoint)

    monkeypatch.setattr(loop, "dispatch_step", dispatch_step)
    monkeypatch.setattr(loop.MetricsLog, "record", record_metrics)
    interrupt_at = None
    straight = loop.train(_config(tmp_path / "straight"))
    assert not straight.stopped_by_signal and straight.final_step == 6
    # One step late: step t's metrics are read after step t+1 is dispatched; the last after the loop.
    assert events == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2),
                      ("dispatch", 4), ("read", 3), ("dispatch", 5), ("read", 4), ("dispatch", 6), ("read", 5),
                      ("read", 6)], events

    interrupt_at = 3  # Ctrl-C while step 3 is dispatched: agreed after step 3, read (and acted on) at step 4
    stopped = loop.train(_config(tmp_path / "broken"))
    assert stopped.stopped_by_signal and stopped.signal_name == "SIGINT" and stopped.final_step == 4
    assert sorted(int(p.name) for p in (tmp_path / "broken" / "checkpoints").iterdir() if p.name.isdigit()) == [4]
    interrupt_at = None
    resumed = loop.train(_config(tmp_path / "broken"))
    assert resumed.final_step == 6 and not resumed.stopped_by_signal
    assert stopped.losses + resumed.losses == straight.losses  # bitwise
