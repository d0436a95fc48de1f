"""The version matrix: scenario selection, verdicts, the table, the child run on this release,
and the n/a rule of the catalogue (a scenario whose feature is missing is reported, never
silently skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from livekit_safeclose.testing import features
from livekit_safeclose.testing.matrix import CI_RELEASES, RELEASES, ok
from livekit_safeclose.testing.matrix.table import markdown
from livekit_safeclose.testing.matrix.verdicts import hang_class, select, vanilla_state, verdict
from livekit_safeclose.testing.scenarios import HANG_CLASSES, SCENARIOS


def test_releases_cover_1_5_0_to_1_8_9_and_ci_takes_each_minor_lines_ends() -> None:
    assert len(RELEASES) == 41 and RELEASES[0] == "1.5.0" and RELEASES[-1] == "1.8.9"
    assert CI_RELEASES == ("1.5.0", "1.5.17", "1.6.0", "1.6.10", "1.7.0", "1.7.1", "1.8.0", "1.8.9")
    assert set(CI_RELEASES) <= set(RELEASES)


def test_lean_takes_every_hang_class_once_and_every_other_scenario() -> None:
    lean = select("lean")
    assert {hang_class(s) for s in lean} == {hang_class(s) for s in SCENARIOS}
    assert len([s for s in lean if hang_class(s) != s]) == len(HANG_CLASSES)
    assert select("all") == list(SCENARIOS)
    with pytest.raises(SystemExit, match="unknown"):
        select("no-such-scenario")


def _run(**kw: Any) -> dict[str, Any]:
    base = {"closed": True, "ms": 500.0, "provider_open": 0, "streams_open": 0, "close_events": 1,
            "tasks_left": 0, "clean": True, "error": ""}  # fmt: skip
    return base | kw


def test_verdicts() -> None:
    hang, control = SCENARIOS["tool-park-aclose"], SCENARIOS["healthy-aclose"]
    assert verdict(hang, _run(closed=False, clean=False), _run(), 3000) == "fixed"
    # vanilla closed, but left a provider stream open: the bug shows all the same
    assert verdict(hang, _run(provider_open=1, clean=False), _run(), 3000) == "fixed"
    assert verdict(hang, _run(), _run(), 3000) == "no hang on vanilla"
    assert verdict(hang, _run(closed=False), _run(ms=3400.0), 3000) == "FAIL"
    assert verdict(hang, _run(closed=False), _run(close_events=2, clean=False), 3000) == "FAIL"
    assert verdict(control, _run(), _run(), 3000) == "ok"
    assert verdict(control, _run(closed=False, clean=False), _run(), 3000) == "vanilla control failed"
    assert vanilla_state(_run(tasks_left=2), leaves_task=True) == "closes"
    assert vanilla_state(_run(tasks_left=2), leaves_task=False) == "leaks"
    assert vanilla_state(_run(closed=False, error="boom"), leaves_task=False) == "error"


def _results() -> dict[str, Any]:
    fixed = {"id": "tool-park-aclose", "verdict": "fixed", "vanilla_state": "hangs", "bound_ms": 3000,
             "vanilla": _run(closed=False), "layer": _run()}  # fmt: skip
    na = {"id": "session-toolset-aclose-hang-aclose", "verdict": "n/a", "reason": "no Toolset.aclose()"}

    def rec(rows: list[dict[str, Any]], refused: dict[str, list[str]]) -> dict[str, Any]:
        return {
            "venv": {"ok": True, "undeclared": ["httpx"]},
            "install": {"ok": True, "shapes": {"tool_registry": "tagged_tasks"}, "refused": refused},
            "bounds": {"transcript_wait": 2.0},
            "scenarios": rows,
            "shard_wall_s": 60.0,
        }

    return {
        "scenarios": "lean",
        "jobs": 4,
        "wall_s": 120.0,
        "releases": {
            "1.5.0": rec([fixed, na], {"bounded_drain_end": ["_JobProc._shutdown_job()"]}),
            "1.5.1": rec([fixed, na], {"bounded_drain_end": ["_JobProc._shutdown_job()"]}),
        },
    }


def test_markdown_names_forms_reasons_and_refused_parts_over_merged_ranges() -> None:
    text = markdown(_results(), command="livekit-safeclose matrix --releases 1.5.0,1.5.1")
    assert "| 1.5.0 | yes (+httpx) | tools: tagged_tasks; transcript: fixed 2 s | 1 | 1 | 0 | 1 | 0 |" in text
    assert "| session-toolset-aclose-hang | 1.5.0-1.5.1 | no Toolset.aclose() |" in text
    assert "| bounded_drain_end | 1.5.0-1.5.1 | _JobProc._shutdown_job() |" in text
    assert "**1.5.0-1.5.1**: hangs 1/1, fixed 1/1" in text
    assert ok(_results())


def test_a_failing_scenario_fails_the_matrix() -> None:
    results = _results()
    results["releases"]["1.5.1"]["scenarios"][0] = {
        "id": "tool-park-aclose", "verdict": "FAIL", "bound_ms": 3000, "layer": _run(ms=9000.0)
    }  # fmt: skip
    assert not ok(results)
    assert "1.5.1 tool-park-aclose: FAIL" in markdown(results, command="x")


def test_no_scenario_is_na_on_this_release() -> None:
    assert {sid: sc.not_applicable() for sid, sc in SCENARIOS.items() if sc.not_applicable()} == {}


def test_a_scenario_whose_feature_is_missing_is_na_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a release whose ``llm.Toolset`` has no ``aclose()`` (1.5.0), the toolset classes
    say why they cannot run."""
    from livekit.agents import llm

    monkeypatch.delattr(llm.Toolset, "aclose")
    na = {sid for sid, sc in SCENARIOS.items() if sc.not_applicable()}
    assert na == {sid for sid in SCENARIOS if "toolset" in sid}
    reason = SCENARIOS["agent-toolset-aclose-hang-aclose"].not_applicable()
    assert reason is not None and "Toolset has no setup()/aclose()" in reason


def test_the_transcript_keyword_follows_the_release() -> None:
    assert features.transcript_kwargs(0.3) == {"session_close_transcript_timeout": 0.3}
    assert features.close_transcript_wait(0.3) == 0.3


def test_a_replayed_schedules_broken_invariants_are_vanilla_evidence_not_a_broken_run() -> None:
    """A fuzz-found scenario's run lists its broken invariants in ``error``: on vanilla that
    is the bug showing (hangs or leaks), while an exception of the run proves nothing."""
    findings = "close-events: 0 close event(s) for 1 start(s)"
    assert vanilla_state(_run(closed=False, error=findings, broken=False), leaves_task=False) == "hangs"
    assert vanilla_state(_run(error=findings, broken=False), leaves_task=False) == "leaks"
    assert vanilla_state(_run(closed=False, error="TypeError: x", broken=True), leaves_task=False) == "error"


def test_a_fixed_transcript_wait_lengthens_a_fuzz_schedules_close_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a release without ``session_close_transcript_timeout`` (1.5.0-1.5.2) every close
    waits a fixed 2 s for the final transcript: a replayed schedule's bound gets that wait."""
    from livekit_safeclose.testing.fuzz.replay import for_release

    sc = SCENARIOS["fuzz-zombie-tool-tight-bound"]
    assert sc.schedule is not None and for_release(sc.schedule) == sc.schedule
    monkeypatch.setattr(features, "_transcript_option", lambda: False)
    longer = for_release(sc.schedule)
    extra = (
        features.close_transcript_wait(sc.schedule.setup.transcript_timeout)
        - sc.schedule.setup.transcript_timeout
    )
    assert longer.setup.close_timeout == pytest.approx(sc.schedule.setup.close_timeout + extra)
    assert longer.steps == sc.schedule.steps
    assert features.transcript_kwargs(0.3) == {}


@pytest.mark.timeout(300)
def test_child_runs_a_scenario_pair_and_the_install_check_on_this_release() -> None:
    cmd = [sys.executable, "-m", "livekit_safeclose.testing.matrix.child", "--scenarios", "tool-park-aclose"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["install"]["ok"] and "core" in out["install"]["parts"]
    assert out["install"]["shapes"]["tool_registry"] == "executor"
    (row,) = out["scenarios"]
    assert row["verdict"] == "fixed", row
    assert row["vanilla_state"] == "hangs" and row["layer"]["provider_open"] == 0
