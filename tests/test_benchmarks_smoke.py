"""``python benchmarks/run.py`` still runs and keeps its output shape.

Shape only: the numbers are the benchmark's business, and a timed assertion here would
make the suite flaky on a loaded CI machine. The fast sections only, in quick mode.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
RESULTS = RUN.parent / "results"


def _run_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(150)
def test_quick_fast_sections_print_the_table_and_write_the_json(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "latency,quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "| measure | vanilla | layer | target | result |"
    assert any(ln.startswith("| healthy close median, ms") for ln in lines)
    assert any(ln.startswith("| healthy close at the floor") for ln in lines)
    assert any("caused by the closed sessions" in ln for ln in lines)

    doc = json.loads(out.read_text())
    assert {"meta", "targets", "latency", "quiet"} <= set(doc)
    assert doc["meta"]["quick"] is True and doc["meta"]["sections"] == ["latency", "quiet"]
    lat = doc["latency"]
    for mode in ("vanilla", "layer"):
        assert {"n", "median_ms", "p99_ms", "max_ms"} <= set(lat[mode])
    assert {"median", "p99"} <= set(lat["ratios"]) and "forced" in lat["layer"]
    assert lat["floor"]["transcript_timeout_s"] == 0.0
    assert {"median", "p99"} <= set(lat["floor"]["ratios"]) and "forced" in lat["floor"]["layer"]
    for mode in ("vanilla", "layer"):
        q = doc["quiet"][mode]
        assert {"baseline", "after_close", "attributable_wakeups"} <= set(q)
        assert {"wakeups", "top_callbacks"} <= set(q["after_close"])
    assert {"latency_median_ratio", "latency_p99_ratio", "quiet"} <= set(doc["targets"])
    assert {"latency_floor_median_ratio", "latency_floor_p99_ratio"} <= set(doc["targets"])


def test_only_a_full_run_writes_the_committed_results() -> None:
    run = _run_module()
    full = list(run.SECTIONS)
    assert run.default_out(full, quick=False) == RESULTS / "latest.json"
    assert run.default_out(full, quick=True) == RESULTS / "partial" / ("-".join(full) + "-quick.json")
    assert run.default_out(["latency", "quiet"], quick=False) == RESULTS / "partial" / "latency-quiet.json"
    assert run.default_out(["churn"], quick=True) == RESULTS / "partial" / "churn-quick.json"


@pytest.mark.timeout(60)
def test_a_partial_run_refuses_to_overwrite_the_committed_results() -> None:
    latest = RESULTS / "latest.json"
    before = latest.read_bytes() if latest.exists() else None
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "quiet", "--out", str(latest)],
        capture_output=True, text=True, timeout=55,
    )  # fmt: skip
    assert proc.returncode == 2 and "never writes" in proc.stderr, proc.stderr
    assert "running" not in proc.stderr  # refused before any section ran
    assert (latest.read_bytes() if latest.exists() else None) == before


@pytest.mark.timeout(60)
def test_the_floor_profile_prints_calls_per_close_and_its_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN.parent / "profile_floor.py"), "5"],
        capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("vanilla: ") and lines[1].startswith("layer: ")
    assert "| own time grown, profiled us/close | calls grown per close | function |" in lines


@pytest.mark.timeout(60)
def test_the_streams_cost_prints_one_row_per_count_of_other_sessions() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN.parent / "streams_cost.py"), "3", "0", "2"],
        capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| other sessions open | streams_of, us per close | calls per close |")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["0", "2"]
    assert all(ln.split("|")[3].strip() == "2" for ln in lines[2:])  # twice per close
    assert all(float(ln.split("|")[4]) > 0 for ln in lines[2:])  # each session opened its STT stream
