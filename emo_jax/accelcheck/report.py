"""The results document of an accelerator check: sections of records, JSON and markdown.

A section (one per subprocess) appends records to its own part file, rewritten after
every record, so a section killed at its time limit still leaves what it measured.
Records are plain dicts with a `kind`:
  info   {"kind": "info", "name", "value"}                         facts (versions, peaks)
  check  {"kind": "check", "name", "passed", "rel_err", "tol", ...} a kernel vs its reference
  bench  {"kind": "bench", "name", "impl", "seconds", "flops", "tflops", "mfu", ...}
  error  {"kind": "error", "name", "error"}                          a row that raised
Section status: ok | failed (a check failed) | error (a row raised, or the section
crashed) | timeout | skipped (no time left in the budget).
Exit code of the whole check: 1 if any check failed or the correctness section did not
finish ok, else 3 if another section is not ok, else 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

CORRECTNESS = "correctness"
PEAKS_RECORD = "peaks FLOP/s"  # env's record whose value the runner hands to later sections
SLOW_RECORD = "slow implementations"  # {impl: why}: later sections skip these (the runner hands them on)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: they become strings, so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _clean(record: dict) -> dict:
    return {k: _finite_or_none(v) for k, v in record.items()}


def write_json(path: str | Path, data: Any) -> None:
    """Atomic write (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)


class SectionLog:
    """Records of one section, flushed to `path` after each one (None: kept in memory)."""

    def __init__(self, name: str, path: str | Path | None = None):
        self.name = name
        self.path = Path(path) if path else None
        self.records: list[dict] = []
        self.started = time.time()
        self.flush()

    def add(self, record: dict) -> dict:
        self.records.append(_clean(record))
        self.flush()
        print(f"[{self.name}] {format_record(record)}", flush=True)
        return record

    def info(self, name: str, value: Any) -> None:
        self.add({"kind": "info", "name": name, "value": value})

    def error(self, name: str, err: BaseException) -> None:
        message = f"{type(err).__name__}: {err}".strip()
        self.add({"kind": "error", "name": name, "error": message[:2000]})

    def as_dict(self) -> dict:
        return {"name": self.name, "records": self.records, "seconds": round(time.time() - self.started, 2)}

    def flush(self) -> None:
        if self.path is not None:
            write_json(self.path, self.as_dict())


def section_status(records: list[dict], finished: bool, timed_out: bool = False) -> str:
    if timed_out:
        return "timeout"
    if any(r["kind"] == "check" and not r.get("passed") for r in records):
        return "failed"
    if not finished or any(r["kind"] == "error" for r in records):
        return "error"
    return "ok"


def exit_code(doc: dict) -> int:
    sections = doc["sections"]
    checks = [r for s in sections.values() for r in s["records"] if r["kind"] == "check"]
    if any(not r.get("passed") for r in checks):
        return 1
    if CORRECTNESS in sections and sections[CORRECTNESS]["status"] != "ok":
        return 1
    if any(s["status"] != "ok" for s in sections.values()):
        return 3
    return 0


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_record(r: dict) -> str:
    kind = r["kind"]
    if kind == "check":
        verdict = "PASS" if r.get("passed") else "FAIL"
        return f"{verdict} {r['name']}: rel. error {_fmt(r.get('rel_err'))} (tolerance {_fmt(r.get('tol'))})" + (
            f" {r['detail']}" if r.get("detail") else "")
    if kind == "bench":
        parts = [f"{r['name']} [{r.get('impl', '')}]"]
        if r.get("seconds") is not None:
            parts.append(f"{1e3 * r['seconds']:.3f} ms")
        if r.get("tflops") is not None:
            parts.append(f"{r['tflops']:.4g} TFLOP/s")
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("gbs") is not None:
            parts.append(f"{r['gbs']:.4g} GB/s")
        if r.get("note"):
            parts.append(str(r["note"]))
        return ", ".join(parts)
    if kind == "error":
        return f"ERROR {r['name']}: {r['error']}"
    return f"{r['name']} = {r.get('value')}"


def render_markdown(doc: dict) -> str:
    """The document as markdown: a header, then one table per section."""
    meta = doc["meta"]
    lines = [f"# Accelerator check ({meta.get('mode', '')})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- exit code: {doc['exit_code']}", ""]
    for name, s in doc["sections"].items():
        lines += [f"## {name}: {s['status']} ({s.get('seconds', 0):.0f} s)", ""]
        if s.get("error"):
            lines += [f"section error: `{s['error'][:500]}`", ""]
        infos = [r for r in s["records"] if r["kind"] == "info"]
        if infos:
            lines += [f"- {r['name']}: {r['value']}" for r in infos] + [""]
        checks = [r for r in s["records"] if r["kind"] == "check"]
        if checks:
            lines += ["| check | result | rel. error | tolerance | detail |", "|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {'PASS' if r.get('passed') else 'FAIL'} | {_fmt(r.get('rel_err'))} | "
                      f"{_fmt(r.get('tol'))} | {r.get('detail', '')} |" for r in checks] + [""]
        benches = [r for r in s["records"] if r["kind"] == "bench"]
        if benches:
            lines += ["| row | impl | ms | TFLOP/s | MFU (datasheet) | of measured peak | GB/s | note |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in benches:
                ms = _fmt(1e3 * r["seconds"], 4) if r.get("seconds") is not None else ""
                pct = lambda v: f"{100 * v:.1f}%" if v is not None else ""  # noqa: E731
                lines.append(f"| {r['name']} | {r.get('impl', '')} | {ms} | {_fmt(r.get('tflops'), 4)} | "
                             f"{pct(r.get('mfu'))} | {pct(r.get('mfu_measured'))} | {_fmt(r.get('gbs'), 4)} | "
                             f"{r.get('note', '')} |")
            lines.append("")
        errors = [r for r in s["records"] if r["kind"] == "error"]
        lines += [f"- ERROR {r['name']}: `{r['error'][:300]}`" for r in errors]
        if errors:
            lines.append("")
    return "\n".join(lines)
