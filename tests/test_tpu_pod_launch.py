"""launch/tpu_pod.sh --dry-run: every command for a v5p-128 slice is printed, none is run."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(tmp_path: Path, action: str = "all", *args: str) -> tuple[list[list[str]], list[str]]:
    """(printed commands as argv lists, printed comments); fails if any command ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    ran = tmp_path / "ran.txt"
    for name in ("gcloud", "git", "gcsfuse"):  # stand-ins that record any call
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {ran}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_NAME="emo-v5p", ZONE="us-east5-a",
               PROJECT="my-project", ACCELERATOR="v5p-128", BUCKET="my-bucket", RUN_DIR="/mnt/gcs/emo_1b14b",
               ACTION=action)
    done = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not ran.exists(), f"--dry-run ran: {ran.read_text()}"
    lines = done.stdout.splitlines()
    return [shlex.split(line) for line in lines if not line.startswith("#")], [l for l in lines if l.startswith("#")]


def test_dry_run_prints_every_command_for_a_v5p_128_slice(tmp_path):
    commands, comments = _dry_run(tmp_path, "all", "--config", "configs/emo_1b14b.yaml",
                                  "data.data_dir=/mnt/gcs/data", "train.note=two words")
    assert any("v5p-128: 64 chips on 16 host(s)" in c for c in comments), comments
    where = ["--zone", "us-east5-a", "--project", "my-project"]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert commands[0] == tpu + ["describe", "emo-v5p"] + where
    assert commands[1] == tpu + ["create", "emo-v5p", "--accelerator-type", "v5p-128", "--version",
                                 "v2-alpha-tpuv5"] + where
    assert commands[2][:2] == ["git", "archive"]
    assert commands[3] == tpu + ["scp", "/tmp/emo_jax_src.tar.gz", "emo-v5p:~/emo_jax_src.tar.gz",
                                 "--worker=all"] + where
    ssh_all = tpu + ["ssh", "emo-v5p", "--worker=all", "--command"]
    setup, mount, train, logs = commands[4:]
    for command in (setup, mount, train):
        assert command[:-5] == ssh_all and command[-4:] == where, command
    assert "launch/setup.sh" in setup[-5] and "jax[tpu]" in setup[-5]
    assert "gcsfuse --implicit-dirs my-bucket /mnt/gcs" in mount[-5]
    # The remote command line, as each worker's shell will split it.
    remote = shlex.split(train[-5])
    at = remote.index(".venv/bin/emo-jax")
    assert remote[at:at + 7] == [".venv/bin/emo-jax", "train", "--config", "configs/emo_1b14b.yaml",
                                 "data.data_dir=/mnt/gcs/data", "train.note=two words",
                                 "train.run_dir=/mnt/gcs/emo_1b14b"]
    assert "train.progress_bar=false" in remote and remote[0] == "cd" and remote[1] == "emo_jax"
    assert logs == tpu + ["ssh", "emo-v5p", "--worker=0", "--command", "tail -n +1 -F emo_jax/train.log"] + where


def test_dry_run_stop_and_delete(tmp_path):
    (stop,), _ = _dry_run(tmp_path, "stop")
    assert stop[4:7] == ["ssh", "emo-v5p", "--worker=all"] and stop[8] == "kill -TERM $(cat emo_jax/train.pid)"
    (delete,), _ = _dry_run(tmp_path, "delete")
    assert delete[4:] == ["delete", "emo-v5p", "--quiet", "--zone", "us-east5-a", "--project", "my-project"]
