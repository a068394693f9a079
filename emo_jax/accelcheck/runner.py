"""The accelerator check's orchestrator: sections in order, each bounded, one results file.

  python -m emo_jax.accelcheck --out DIR                  EMO shapes, compiled GPU kernels
  python -m emo_jax.accelcheck --tiny --interpret         tiny shapes, Pallas interpreter (CPU)
  python -m emo_jax.accelcheck --dry-run                  the plan only (imports no jax)

Each section runs in its own subprocess (`--in-process` runs them in this one, without
time limits: for tests) with a time limit: its default, cut to what is left of
`--budget`. A section that raises records the error, one that hangs is killed at its
limit (its process group), and the next one starts; a section with no time left is
skipped. The results file DIR/accelerator_check.json holds every record (see `report`);
the markdown rendering is printed at the end. Exit code: 1 if a correctness check failed
or did not run to the end, 3 if another section failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from emo_jax.accelcheck import report
from emo_jax.accelcheck.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[2]
RESULTS_NAME = "accelerator_check.json"
# (section, time limit in seconds on a GPU at EMO shapes), in the order they run: the most
# important first, the rows that may be pathological (ragged_dot) last inside each.
SECTIONS = (("env", 60), ("correctness", 180), ("kernels", 90), ("moe_layer", 75), ("attention", 60),
            ("step_pallas", 90), ("step_capacity", 75), ("step_reference", 75))
SECTION_NAMES = tuple(name for name, _ in SECTIONS)
TINY_TIMEOUT_SCALE = 4.0  # interpret mode on a shared CPU is slow
MIN_SECTION_S = 10.0  # a section with less time left than this is skipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emo_jax.accelcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "accelerator_check_out",
                   help="folder of the results file (default: $OUT, else ./accelerator_check_out)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU); default: EMO's layer shape")
    p.add_argument("--interpret", action="store_true", help="run the Pallas kernels in Pallas's interpreter")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all sections together (default 450 at EMO shapes, 1800 tiny)")
    p.add_argument("--sections", nargs="+", choices=SECTION_NAMES, default=list(SECTION_NAMES),
                   help="sections to run, in the fixed order (env always runs first)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiplies every section's time limit")
    p.add_argument("--in-process", action="store_true", help="run the sections in this process (no time limits)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    # internal: one section in a subprocess
    p.add_argument("--run-section", choices=SECTION_NAMES, help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--hints", default="{}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def mode_text(args) -> str:
    shapes = "tiny shapes" if args.tiny else "EMO layer shape"
    kernels = "Pallas interpret mode (simulated: NOT accelerator numbers)" if args.interpret else "compiled kernels"
    return f"{shapes}, {kernels}"


def plan(args) -> list[tuple[str, float]]:
    wanted = ["env"] + [s for s in args.sections if s != "env"]
    scale = (TINY_TIMEOUT_SCALE if args.tiny else 1.0) * args.limit_scale
    return [(name, limit * scale) for name, limit in SECTIONS if name in wanted]


# ----------------------------------------------------------------------------- one section


def execute(name: str, ctx, log: report.SectionLog):
    """Runs section `name` in this process (imports jax)."""
    from emo_jax.accelcheck import bench, correctness, env, train_step

    if name == "env":
        return env.run(ctx, log)
    if name == "correctness":
        return correctness.run(ctx, log)
    if name == "kernels":
        return bench.kernels(ctx, log)
    if name == "moe_layer":
        return bench.moe_layer(ctx, log)
    if name == "attention":
        return bench.attention(ctx, log)
    if name.startswith("step_"):
        return train_step.run(ctx, log, name[len("step_"):])
    raise ValueError(f"unknown section {name!r}")


def make_context(args, hints: dict):
    """The sections' context; `hints` are what earlier sections found (the peaks, slow
    implementations)."""
    from emo_jax.accelcheck.context import Context
    shapes = SHAPES["tiny" if args.tiny else "emo"]
    return Context(shapes, args.interpret, hints.get("peaks", {}), hints.get("slow", {}))


def update_hints(hints: dict, section: dict) -> None:
    """Collects env's peaks and every section's slow implementations for the next ones."""
    peaks = _record_value(section, report.PEAKS_RECORD)
    if peaks:
        hints["peaks"] = peaks
    for r in section["records"]:
        if r["kind"] == "info" and r["name"] == report.SLOW_RECORD:
            hints.setdefault("slow", {}).update(r["value"])


def run_one_section(args) -> int:
    """Child process: one section, records flushed to --part after each one."""
    log = report.SectionLog(args.run_section, args.part)
    try:
        ctx = make_context(args, json.loads(args.hints))
        execute(args.run_section, ctx, log)
    except BaseException as err:  # noqa: BLE001 - recorded, then a non-zero exit
        log.error("section", err)
        log.info("traceback", traceback.format_exc()[-3000:])
        return 2
    return 0


def _subprocess_section(name: str, args, limit: float, hints: dict, parts: Path) -> dict:
    part = parts / f"{name}.json"
    cmd = [sys.executable, "-m", "emo_jax.accelcheck", "--run-section", name, "--part", str(part),
           "--hints", json.dumps(hints)]
    cmd += (["--tiny"] if args.tiny else []) + (["--interpret"] if args.interpret else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    timed_out = False
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    try:
        records, unreadable = (json.loads(part.read_text())["records"] if part.exists() else []), None
    except (OSError, ValueError, KeyError) as err:
        records, unreadable = [], f"its records could not be read back: {err}"
    section = {"status": report.section_status(records, finished=(rc == 0 and not unreadable), timed_out=timed_out),
               "seconds": round(time.time() - start, 2), "limit_s": round(limit, 1), "records": records}
    if timed_out:
        section["error"] = f"killed at its time limit of {limit:.0f} s"
    elif rc != 0:
        section["error"] = f"section process exited with code {rc}"
    elif unreadable:
        section["error"] = unreadable
    return section


def _in_process_section(name: str, args, hints: dict) -> dict:
    log = report.SectionLog(name)
    start = time.time()
    finished = True
    try:
        execute(name, make_context(args, hints), log)
    except Exception as err:  # noqa: BLE001
        log.error("section", err)
        log.info("traceback", traceback.format_exc()[-3000:])
        finished = False
    return {"status": report.section_status(log.records, finished), "seconds": round(time.time() - start, 2),
            "limit_s": None, "records": log.records}


def _record_value(section: dict, name: str):
    for r in section["records"]:
        if r["kind"] == "info" and r["name"] == name:
            return r["value"]
    return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "-"
    except Exception:  # noqa: BLE001
        return "-"


# ----------------------------------------------------------------------------- the whole check


def run_check(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The sections' part files live outside --out: $OUT on the device machine brings back 8 files at most.
    parts = Path(tempfile.mkdtemp(prefix="accelcheck_parts_"))
    try:
        return _run_sections(args, out, parts)
    finally:
        shutil.rmtree(parts, ignore_errors=True)


def _run_sections(args, out: Path, parts: Path) -> dict:
    budget = args.budget if args.budget is not None else (1800.0 if args.tiny else 450.0)
    start = time.time()
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"mode": mode_text(args), "started_utc": now.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "emo_jax.accelcheck"] + (args.argv or [])),
            "commit": _git_commit(), "budget_s": budget, "isolation": "in-process" if args.in_process else "subprocess"}
    doc = {"meta": meta, "sections": {}, "exit_code": None}
    hints: dict = {}
    stop_reason = None
    for name, limit in plan(args):
        left = budget - (time.time() - start)
        if stop_reason or left < MIN_SECTION_S:
            doc["sections"][name] = {"status": "skipped", "seconds": 0.0, "records": [],
                                     "error": stop_reason or f"no time left in the {budget:.0f} s budget"}
            continue
        print(f"=== section {name} (limit {min(limit, left):.0f} s, {left:.0f} s of the budget left)", flush=True)
        try:
            if args.in_process:
                section = _in_process_section(name, args, hints)
            else:
                section = _subprocess_section(name, args, min(limit, left), hints, parts)
        except Exception as err:  # noqa: BLE001 - the orchestrator itself must always write its file
            section = {"status": "error", "seconds": 0.0, "records": [], "error": f"{type(err).__name__}: {err}"}
        update_hints(hints, section)
        doc["sections"][name] = section
        if name == "env":
            backend = _record_value(section, "backend")
            if backend is not None and backend not in ("gpu", "cuda") and not args.interpret:
                stop_reason = (f"no GPU (jax backend {backend!r}): the check compiles Triton kernels; on a CPU run "
                               "it with --tiny --interpret")
                section["status"] = "error"
                section["error"] = stop_reason
            elif section["status"] != "ok":
                stop_reason = "the env section failed"
        meta["wall_s"] = round(time.time() - start, 1)
        doc["exit_code"] = report.exit_code(doc)
        report.write_json(out / RESULTS_NAME, doc)
    meta["wall_s"] = round(time.time() - start, 1)
    doc["exit_code"] = report.exit_code(doc)
    report.write_json(out / RESULTS_NAME, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.run_section:
        return run_one_section(args)
    if args.dry_run:
        print(f"accelerator check plan: {mode_text(args)}; results -> {Path(args.out) / RESULTS_NAME}")
        for name, limit in plan(args):
            print(f"  {name:16s} limit {limit:5.0f} s")
        return 0
    doc = run_check(args)
    print(report.render_markdown(doc))
    print(f"results: {Path(args.out) / RESULTS_NAME}; exit code {doc['exit_code']}")
    return doc["exit_code"]
