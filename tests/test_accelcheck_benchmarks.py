"""The accelerator check's benchmark sections at tiny shapes, the GPU kernels interpreted
(the correctness section, the launcher and the pure parts: test_accelcheck.py).

Every section but the two extra training-step variants, which are step_pallas's code with
another MoE backend name (each backend also runs in the kernels and moe_layer sections);
all eight run through the launcher in test_accelcheck.py's slow test.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from accelcheck_helpers import assert_sections_ok, run_tiny  # noqa: E402

SECTIONS = ["env", "kernels", "moe_layer", "attention", "step_pallas"]


def test_tiny_interpret_benchmark_sections(tmp_path):
    """Every benchmark row at tiny shapes: ok, finite, the rows the GPU run reports present,
    MoE backends agreeing at the layer, the training loss finite."""
    rc, doc = run_tiny(tmp_path, "--sections", *SECTIONS)
    assert list(doc["sections"]) == SECTIONS
    assert_sections_ok(doc)
    assert rc == 0 and doc["exit_code"] == 0
    benches = {(r["name"], r["impl"]): r for s in doc["sections"].values() for r in s["records"]
               if r["kind"] == "bench"}
    for row in [("dense matmul [M,D]x[D,H] fwd (equal FLOPs)", "xla"), ("grouped matmul fwd", "pallas"),
                ("grouped matmul fwd+bwd", "pallas"), ("grouped matmul fwd", "reference"),
                ("dispatch+combine fwd+bwd", "pallas"), ("dispatch+combine fwd+bwd", "reference"),
                *[("expert computation fwd+bwd", b) for b in ("pallas", "capacity", "blocked", "reference")],
                *[("MoE layer fwd+bwd", b) for b in ("pallas", "capacity", "blocked", "reference")],
                *[(f"attention fwd+bwd, {lay}", k) for lay in ("1 document/row", "packed documents")
                  for k in ("flash", "blocked", "reference")],
                ("train step", "pallas")]:
        assert row in benches, row
        assert benches[row]["seconds"] > 0
    step = benches[("train step", "pallas")]
    assert step["mfu_measured"] > 0 and step["flops"] > 0
    assert step["mfu"] is None  # no datasheet peak for a CPU
    layer_checks = [r for r in doc["sections"]["moe_layer"]["records"] if r["kind"] == "check"]
    assert len(layer_checks) == 12 and all(r["passed"] for r in layer_checks)
    assert any(r["name"] == "train step [pallas]: loss finite" and r["passed"]
               for r in doc["sections"]["step_pallas"]["records"])
