"""``python benchmarks/run.py`` still runs and keeps its output shape.

Shape only: the numbers are the benchmark's business, and a timed assertion here would
make the suite flaky on a loaded CI machine. The fast sections only, in quick mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.mark.timeout(60)
def test_quick_fast_sections_print_the_table_and_write_the_json(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "latency,quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=55,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| measure | vanilla | layer | target | result |"
    assert any(ln.startswith("| healthy close median, ms") for ln in lines)
    assert any("caused by the closed sessions" in ln for ln in lines)

    doc = json.loads(out.read_text())
    assert {"meta", "targets", "latency", "quiet"} <= set(doc)
    assert doc["meta"]["quick"] is True and doc["meta"]["sections"] == ["latency", "quiet"]
    lat = doc["latency"]
    for mode in ("vanilla", "layer"):
        assert {"n", "median_ms", "p99_ms", "max_ms"} <= set(lat[mode])
    assert {"median", "p99"} <= set(lat["ratios"]) and "forced" in lat["layer"]
    for mode in ("vanilla", "layer"):
        q = doc["quiet"][mode]
        assert {"baseline", "after_close", "attributable_wakeups"} <= set(q)
        assert {"wakeups", "top_callbacks"} <= set(q["after_close"])
    assert {"latency_median_ratio", "latency_p99_ratio", "quiet"} <= set(doc["targets"])
