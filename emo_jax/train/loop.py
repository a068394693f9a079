"""The training loop: data, sharded step, metrics, validation, checkpoints, stop signals.

Everything inside one step is the pure jitted function of `train/step.py`; this module
does the I/O around it, in small functions: `start_run` (restore or initialise),
`run_steps` (the loop), `MetricsLog.record` (metrics of a finished step), `evaluate_now`
and `save_now`.

Multi-process runs (one process per host) take every decision that ends or changes the
run at the same step on every process:
- the metrics, hence the NaN stop, are replicated outputs of the step: every process
  reads the same loss;
- a stop signal (SIGTERM = preemption, SIGINT = Ctrl-C) on any process is agreed on by a
  cross-process max (`parallel/agreement.py`), read one step after it is dispatched,
  so every process saves the same step and stops;
- the config and the resumed step are checked to be the same on every process at start.
The host never waits for the step it has just dispatched: step t's metrics and agreement
are read after step t+1 is dispatched (except at log, evaluation, save and stop steps,
which need step t's results).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emo_jax.compat import use_mesh
from emo_jax.config import Config, to_dict
from emo_jax.parallel import distributed
from emo_jax.parallel.agreement import Agreement, check_same_everywhere, fingerprint
from emo_jax.parallel.distributed import maybe_initialize_distributed
from emo_jax.train import batches as batch_sources
from emo_jax.train import metrics as metrics_lib
from emo_jax.train import stops
from emo_jax.train.checkpoint import CheckpointError, Checkpointer, nonfinite_loss_message
from emo_jax.train.evaluate import Evaluator
from emo_jax.train.sharded import ShardedTrainer, make_sharded_trainer
from emo_jax.train.step import BATCH_KEYS


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    losses: list[float]  # loss of every step this process ran, in order
    stopped_by_signal: bool
    run_dir: Path
    signal_name: str | None = None  # "SIGTERM" / "SIGINT" when stopped_by_signal


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------ the run's parts


@dataclasses.dataclass
class Run:
    """What the loop works with; built by `start_run`, closed by `close`."""
    config: Config
    trainer: ShardedTrainer
    source: batch_sources.BatchSource
    checkpointer: Checkpointer
    log: "MetricsLog"
    base_key: jax.Array
    stop_agreement: Agreement
    state: Any = None
    step: int = 0
    evaluator: Evaluator | None = None

    def to_device(self, batch: dict) -> dict:
        """This process's rows -> global arrays sharded over the batch axes."""
        keys = BATCH_KEYS + (("domain_ids",) if "domain_ids" in batch else ())
        return {k: jax.make_array_from_process_local_data(self.trainer.batch_sharding, np.asarray(batch[k]))
                for k in keys}

    def close(self) -> None:
        try:
            self.checkpointer.close()  # waits for the asynchronous save in flight
        finally:
            self.log.close()


def open_checkpointer(config: Config, resume: bool) -> Checkpointer:
    """The run's Checkpointer; with resume=False, refuses a run_dir that holds checkpoints."""
    checkpointer = Checkpointer(Path(config.train.run_dir) / "checkpoints", config.train.checkpoint_every,
                                config.train.keep_checkpoints)
    latest = checkpointer.latest_step()
    if not resume and latest is not None:
        checkpointer.close()
        raise CheckpointError(f"{checkpointer.directory} already holds checkpoints (latest step "
                              f"{latest}); --no-resume needs a fresh run_dir: pass "
                              "train.run_dir=NEW_DIR or delete the old checkpoints.")
    return checkpointer


def restore_or_init(run: Run, resume: bool) -> None:
    """Sets run.state / run.step from the latest good checkpoint, or initialises step 0."""
    restored = run.checkpointer.restore(run.trainer.abstract_state, run.config) if resume else None
    if restored is None:
        run.state, run.step = run.trainer.init_state(run.base_key), 0
        return
    run.state, run.step = restored.state, restored.step
    if restored.data_state:
        run.source.set_state(restored.data_state)
    _log(f"resumed from {run.checkpointer.directory}/{run.step}")


def check_processes_agree(config: Config, start: int) -> None:
    """Every process runs the same config from the same step (one-line error otherwise)."""
    if jax.process_count() == 1:
        return
    config_text = json.dumps(to_dict(config), sort_keys=True)
    check_same_everywhere({"the config": fingerprint(config_text), "the step to start from": start,
                           stops.CHECK_EVERY_ENV: stops.check_every()})


def start_run(config: Config, resume: bool) -> Run:
    """Builds the trainer, data source, checkpointer and metrics log; restores or initialises."""
    trainer = make_sharded_trainer(config)
    distributed.check_processes_fit_mesh(trainer.mesh, trainer.batch_sharding, config.data.global_batch_size,
                                         config.data.seq_len)
    source = batch_sources.train_batches(config)
    checkpointer = open_checkpointer(config, resume)
    run = Run(config=config, trainer=trainer, source=source, checkpointer=checkpointer,
              log=MetricsLog(config), base_key=jax.random.PRNGKey(config.train.seed),
              stop_agreement=Agreement(stops.WIDTH))
    try:
        restore_or_init(run, resume)
        check_processes_agree(config, run.step)
    except BaseException:
        run.close()
        raise
    run.log.start_progress(run.step)
    return run


# ------------------------------------------------------------------------ metrics


class MetricsLog:
    """Train metrics: the per-step loss (NaN stop), window means, the log line, the
    progress bar and metrics.jsonl / TensorBoard."""

    def __init__(self, config: Config):
        self.config = config
        self.writer = metrics_lib.MetricsWriter(Path(config.train.run_dir))
        self.window = metrics_lib.WindowMean()
        self.window_start = time.perf_counter()
        self.losses: list[float] = []
        self.flops_token = metrics_lib.flops_per_token(config, metrics_lib.active_matmul_params(config))
        self.peak = metrics_lib.peak_flops_per_device()
        self.progress = None

    def start_progress(self, start: int) -> None:
        if self.config.train.progress_bar and sys.stderr.isatty() and jax.process_index() == 0:
            from tqdm import tqdm
            self.progress = tqdm(total=self.config.train.steps, initial=start, unit="step", dynamic_ncols=True)

    def record(self, step: int, step_metrics: dict, last_checkpoint: int | None) -> None:
        """The metrics of finished step `step` (1-based); waits for that step only."""
        loss = float(step_metrics["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLossError(nonfinite_loss_message(loss, step, last_checkpoint, self.config))
        self.losses.append(loss)
        self.window.add(step_metrics)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.3f}")
        if step % self.config.train.log_every == 0 or step == self.config.train.steps:
            self.write_window(step)

    def write_window(self, step: int) -> None:
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        m = self.window.result()
        m["tokens_per_second"] = m["tokens"] * m["window_steps"] / elapsed
        m["steps_per_second"] = m["window_steps"] / elapsed
        m["mfu"] = (m["tokens_per_second"] * self.flops_token / (self.peak * jax.device_count())
                    if self.peak else None)
        self.writer.write(step, m)
        if self.progress is None:
            _log(metrics_lib.format_line(step, m))
        self.restart_clock()

    def restart_clock(self) -> None:
        self.window_start = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Time spent evaluating or saving is not training throughput."""
        self.window_start += seconds

    def close(self) -> None:
        self.writer.close()
        if self.progress is not None:
            self.progress.close()


class PendingMetrics:
    """Step metrics dispatched but not read yet: at most one step's (read one step late)."""

    def __init__(self, log: MetricsLog, checkpointer: Checkpointer):
        self.log, self.checkpointer = log, checkpointer
        self.item: tuple[int, dict] | None = None

    def put(self, step: int, step_metrics: dict) -> None:
        self.flush()
        self.item = (step, step_metrics)

    def flush(self) -> None:
        if self.item is not None:
            step, step_metrics = self.item
            self.item = None
            self.log.record(step, step_metrics, self.checkpointer.latest_step())


# ------------------------------------------------------------------------ evaluation, saving


def evaluate_now(run: Run) -> None:
    """Validation loss (per domain) and the routing summary at run.step."""
    start = time.perf_counter()
    if run.evaluator is None:
        run.evaluator = Evaluator(run.config, run.trainer.model, run.to_device)
    result, summary = run.evaluator(run.state.params)
    run.log.writer.write(run.step, result, prefix="eval")
    if summary is not None:
        write_routing_summary(Path(run.config.train.run_dir), run.step, summary)
    _log(format_eval(run.step, result))
    run.log.exclude(time.perf_counter() - start)


def save_now(run: Run, force: bool = False) -> None:
    """Starts an asynchronous save of run.step (orbax copies the arrays before returning)."""
    start = time.perf_counter()
    run.checkpointer.save(run.step, run.state, run.source.get_state(), run.config, run.config.train.seed,
                          force=force)
    run.log.exclude(time.perf_counter() - start)


def is_due(step: int, every: int, total: int) -> bool:
    return bool(every) and (step % every == 0 or step == total)


# ------------------------------------------------------------------------ the loop


def dispatch_step(run: Run) -> dict:
    """Reads this process's next batch and dispatches one step (does not wait for it)."""
    batch = run.to_device(next(run.source))
    run.state, step_metrics = run.trainer.step(run.state, {k: batch[k] for k in BATCH_KEYS},
                                               jax.random.fold_in(run.base_key, run.step))
    run.step += 1
    return step_metrics


def run_steps(run: Run, signals: stops.StopSignals, metrics_delay: int = 1) -> int:
    """Steps until train.steps or an agreed stop signal; returns the signal (0: none).

    metrics_delay=0 reads every step's metrics before the next is dispatched (the old
    behaviour, kept for the benchmark that measures the difference)."""
    config, total = run.config, run.config.train.steps
    pending = PendingMetrics(run.log, run.checkpointer)
    agreed_stop = None  # handle of the stop agreement dispatched one step earlier
    check_every = stops.check_every()
    run.log.restart_clock()
    while run.step < total:
        step_metrics = dispatch_step(run)
        pending.put(run.step, step_metrics)  # records the previous step's metrics
        evaluate, save = is_due(run.step, config.train.eval_every, total), run.checkpointer.should_save(run.step)
        signal_number = 0
        if agreed_stop is not None:
            signal_number, agreed_stop = stops.agreed_signal(run.stop_agreement.result(agreed_stop)), None
        if evaluate or save or signal_number or not metrics_delay:
            pending.flush()  # a NaN step is never evaluated or saved
        if evaluate:
            evaluate_now(run)
        if save:
            save_now(run)
        if signal_number:
            _log(f"{stops.signal_name(signal_number)}: saving step {run.step} and stopping")
            if run.checkpointer.latest_step() != run.step:  # not saved by the periodic save just now
                save_now(run, force=True)
            return signal_number
        if run.step % check_every == 0:
            agreed_stop = run.stop_agreement.start(signals.flags())
    pending.flush()
    if config.train.checkpoint_every and run.checkpointer.latest_step() != run.step:
        save_now(run, force=True)
    return 0


def describe_run(run: Run, start: int) -> str:
    c = run.config
    return (f"{c.name}: steps {start}->{c.train.steps}, mesh {dict(run.trainer.mesh.shape)}, batch "
            f"{c.data.global_batch_size} x {c.data.seq_len}, {c.train.micro_batches} micro-batch(es), "
            f"lb_scope={c.loss.lb_scope}, pool={c.routing.pool}, data={c.data.dataset}, "
            f"{jax.device_count()} x {jax.devices()[0].device_kind} ({distributed.describe()})")


def train(config: Config, resume: bool = True, metrics_delay: int = 1) -> TrainResult:
    """Trains `config`; resumes from the latest checkpoint in run_dir when one exists.

    SIGTERM or Ctrl-C (on any process) saves the agreed step and returns with
    stopped_by_signal; a second Ctrl-C raises KeyboardInterrupt at once."""
    maybe_initialize_distributed()
    run = start_run(config, resume)
    _log(describe_run(run, run.step))
    signal_number = 0
    try:
        with stops.StopSignals() as signals, use_mesh(run.trainer.mesh):
            signal_number = run_steps(run, signals, metrics_delay)
    finally:
        run.close()
    return TrainResult(final_step=run.step, losses=run.log.losses, stopped_by_signal=bool(signal_number),
                       run_dir=Path(config.train.run_dir),
                       signal_name=stops.signal_name(signal_number) if signal_number else None)


# ------------------------------------------------------------------------ outputs


def write_routing_summary(run_dir: Path, step: int, summary: dict) -> None:
    """The latest evaluation's specialisation summary: run_dir/analysis/analysis.json."""
    if jax.process_index() != 0:
        return
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
