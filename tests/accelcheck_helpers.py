"""Shared by test_accelcheck.py and test_accelcheck_benchmarks.py: an in-process tiny run."""

from __future__ import annotations

import json
import math

from emo_jax.accelcheck import runner


def numbers(record: dict):
    for key in ("seconds", "tflops", "mfu", "mfu_measured", "gbs", "rel_err", "flops"):
        if record.get(key) is not None:
            yield key, record[key]


def assert_sections_ok(doc: dict) -> None:
    """Every section ok, every number in every record finite."""
    for name, section in doc["sections"].items():
        assert section["status"] == "ok", (name, section)
        for r in section["records"]:
            for key, value in numbers(r):
                assert isinstance(value, (int, float)) and math.isfinite(value), (name, r["name"], key, value)


def run_tiny(tmp_path, *extra) -> tuple[int, dict]:
    rc = runner.main(["--tiny", "--interpret", "--in-process", "--out", str(tmp_path), *extra])
    return rc, json.loads((tmp_path / runner.RESULTS_NAME).read_text())
