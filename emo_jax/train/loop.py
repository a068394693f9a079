"""The training loop: data, sharded step, metrics, validation, checkpoints, SIGTERM.

Everything inside one step is the pure jitted function of `train/step.py`; this
module does the I/O around it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emo_jax.compat import use_mesh
from emo_jax.config import Config
from emo_jax.train import batches as batch_sources
from emo_jax.train import metrics as metrics_lib
from emo_jax.train.checkpoint import CheckpointError, Checkpointer, nonfinite_loss_message
from emo_jax.train.evaluate import Evaluator
from emo_jax.train.sharded import make_sharded_trainer
from emo_jax.train.step import BATCH_KEYS


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: list[float]  # loss of every step this process ran, in order
    stopped_by_signal: bool
    run_dir: Path


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() on multi-host launches (TPU pods set their own env;
    elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)."""
    if os.environ.get("EMO_JAX_DISTRIBUTED", "auto") == "off":
        return
    multi_host = "JAX_COORDINATOR_ADDRESS" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ \
        or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    if multi_host and not jax.distributed.is_initialized():
        jax.distributed.initialize()


class _SigtermFlag:
    """Turns SIGTERM (TPU preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train(config: Config, resume: bool = True) -> TrainResult:
    """Trains `config`; resumes from the latest checkpoint in run_dir when one exists."""
    maybe_initialize_distributed()
    run_dir = Path(config.train.run_dir)
    trainer = make_sharded_trainer(config)
    mesh = trainer.mesh
    source = batch_sources.train_batches(config)
    checkpointer = Checkpointer(run_dir / "checkpoints", config.train.checkpoint_every,
                                config.train.keep_checkpoints)
    writer = metrics_lib.MetricsWriter(run_dir)
    base_key = jax.random.PRNGKey(config.train.seed)

    def to_device(batch: dict) -> dict:
        keys = BATCH_KEYS + (("domain_ids",) if "domain_ids" in batch else ())
        return {k: jax.make_array_from_process_local_data(trainer.batch_sharding, np.asarray(batch[k]))
                for k in keys}

    if not resume and checkpointer.latest_step() is not None:
        latest = checkpointer.latest_step()
        checkpointer.close()
        writer.close()
        raise CheckpointError(f"{checkpointer.directory} already holds checkpoints (latest step "
                              f"{latest}); --no-resume needs a fresh run_dir: pass "
                              "train.run_dir=NEW_DIR or delete the old checkpoints.")
    restored = checkpointer.restore(trainer.abstract_state, config) if resume else None
    if restored is not None:
        state = restored.state
        if restored.data_state:
            source.set_state(restored.data_state)
        start = restored.step
        _log(f"resumed from {checkpointer.directory}/{start}")
    else:
        state = trainer.init_state(base_key)
        start = 0

    flops_token = metrics_lib.flops_per_token(config, metrics_lib.active_matmul_params(config))
    peak = metrics_lib.peak_flops_per_device()
    evaluator = None
    total = config.train.steps
    _log(f"{config.name}: steps {start}->{total}, mesh {dict(mesh.shape)}, batch "
         f"{config.data.global_batch_size} x {config.data.seq_len}, {config.train.micro_batches} micro-batch(es), "
         f"lb_scope={config.loss.lb_scope}, pool={config.routing.pool}, data={config.data.dataset}, "
         f"{jax.device_count()} x {jax.devices()[0].device_kind}")

    progress = None
    if config.train.progress_bar and sys.stderr.isatty() and jax.process_index() == 0:
        from tqdm import tqdm
        progress = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    losses: list[float] = []
    stopped = False
    step = start
    window = metrics_lib.WindowMean()  # the logged metrics are means over the log window
    window_start = time.perf_counter()
    try:
        with _SigtermFlag() as sigterm, use_mesh(mesh):
            while step < total:
                batch = to_device(next(source))
                state, step_metrics = trainer.step(state, {k: batch[k] for k in BATCH_KEYS},
                                                   jax.random.fold_in(base_key, step))
                loss = float(step_metrics["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLossError(nonfinite_loss_message(loss, step + 1, checkpointer.latest_step(),
                                                                    config))
                losses.append(loss)
                step += 1
                window.add(step_metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.3f}")
                if step % config.train.log_every == 0 or step == total:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    m = window.result()
                    m["tokens_per_second"] = m["tokens"] * m["window_steps"] / elapsed
                    m["steps_per_second"] = m["window_steps"] / elapsed
                    m["mfu"] = (m["tokens_per_second"] * flops_token / (peak * jax.device_count())
                                if peak else None)
                    writer.write(step, m)
                    if progress is None:
                        _log(metrics_lib.format_line(step, m))
                    window_start = time.perf_counter()
                if config.train.eval_every and (step % config.train.eval_every == 0 or step == total):
                    if evaluator is None:
                        evaluator = Evaluator(config, trainer.model, to_device)
                    result, summary = evaluator(state.params)
                    writer.write(step, result, prefix="eval")
                    if summary is not None:
                        write_routing_summary(run_dir, step, summary)
                    _log(format_eval(step, result))
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if checkpointer.should_save(step):
                    checkpointer.save(step, state, source.get_state(), config, config.train.seed)
                if sigterm.raised:
                    _log(f"SIGTERM: saving step {step} and stopping")
                    if checkpointer.latest_step() != step:  # not saved by the periodic save just now
                        checkpointer.save(step, state, source.get_state(), config, config.train.seed, force=True)
                    stopped = True
                    break
            else:
                if config.train.checkpoint_every and checkpointer.latest_step() != step:
                    checkpointer.save(step, state, source.get_state(), config, config.train.seed, force=True)
    finally:
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    return TrainResult(final_step=step, losses=losses, stopped_by_signal=stopped, run_dir=run_dir)


def write_routing_summary(run_dir: Path, step: int, summary: dict) -> None:
    """The latest evaluation's specialisation summary: run_dir/analysis/analysis.json."""
    if jax.process_index() != 0:
        return
    import json
    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "analysis.json.tmp"
    tmp.write_text(json.dumps({"step": step, **summary}))
    tmp.replace(out / "analysis.json")


def format_eval(step: int, result: dict) -> str:
    line = f"eval step {step}: loss {result['loss']:.4f}  " + "  ".join(
        f"{k.split('/', 1)[1]} {v:.3f}" for k, v in result.items() if k.startswith("loss/"))
    if "specialisation/centered_cosine" in result:
        line += ("\n  centred domain cosine per layer " + ", ".join(
            f"{v:.3f}" for v in result["specialisation/centered_cosine"]) + "; experts for 90% of a document's "
                 "routing " + ", ".join(f"{v:.1f}" for v in result["specialisation/experts_for_90pct_mass"]))
    return line
