"""Every hang class x close path: closes within the bound with the layer, hangs without.

Each scenario runs twice: with the layer (must close within ``close_timeout`` plus a small
margin, with zero provider connections open and exactly one close event) and on vanilla
livekit-agents (must *not* close within 1 s), which proves the scenario exercises the bug.
"""

from __future__ import annotations

import pytest

from livekit_safeclose.testing.scenarios import SCENARIOS, Scenario, run_scenario
from livekit_safeclose.testing.scenarios.runner import GRACEFUL_TIMEOUT

DRAIN, CLOSE = 0.5, 3.0
MARGIN_MS = 150

HANGS = [s for s in SCENARIOS.values() if s.vanilla_hangs]
CONTROLS = [s for s in SCENARIOS.values() if not s.vanilla_hangs and not s.vanilla_leaks]
LEAKS = [s for s in SCENARIOS.values() if s.vanilla_leaks]


def _ids(s: Scenario) -> str:
    return s.id


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sc", HANGS, ids=_ids)
async def test_layer_closes_within_bound(sc: Scenario) -> None:
    out = await run_scenario(sc, patched=True, drain_timeout=DRAIN, close_timeout=CLOSE)
    report = out.report
    # a graceful close that cannot finish escalates at graceful_timeout, then is bounded
    bound_ms = (CLOSE + (GRACEFUL_TIMEOUT if sc.path == "graceful" else 0.0)) * 1000 + MARGIN_MS
    assert out.closed, f"{sc.id}: did not close: {report.summary() if report else out.error}"
    assert out.ms <= bound_ms, report.summary()
    assert out.provider_open == 0, f"{sc.id}: provider connections left open: {report.summary()}"
    assert out.streams_open == 0, report.summary()
    # every close of a started (or starting) session emits exactly one close event
    assert out.close_events == 1, report.summary()
    # nothing opened on the session's behalf outlives the close (but the scenario's own
    # tasks made to outlive it: a tool that swallows cancellation)
    assert sc.leaves_task or out.tasks_left == 0, (
        f"{sc.id}: {out.tasks_left} task(s) left: {report.summary()}"
    )
    assert report is not None and report.duration_ms <= bound_ms
    if sc.id != "tool-awaits-aclose" and not sc.restart:
        # the report says what was stuck (or which step was abandoned)
        assert report.forced, report.summary()
        assert report.stuck or report.abandoned, report.summary()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sc", HANGS, ids=_ids)
async def test_vanilla_hangs(sc: Scenario) -> None:
    """The same scenario on unpatched livekit-agents does not close: the test bites."""
    out = await run_scenario(sc, patched=False, limit=1.0)
    assert not out.closed, f"{sc.id}: vanilla closed in {out.ms} ms: the scenario does not show the bug"


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sc", CONTROLS, ids=_ids)
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_controls_close_on_both(sc: Scenario, patched: bool) -> None:
    out = await run_scenario(sc, patched=patched, drain_timeout=DRAIN, close_timeout=CLOSE)
    assert out.clean, out
    if patched and sc.schedule is None:  # a fuzz-found one may force (a slow hook, tight bounds)
        assert not out.report.forced, out.report.summary()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sc", LEAKS, ids=_ids)
async def test_leaks_on_vanilla_clean_with_the_layer(sc: Scenario) -> None:
    """Vanilla closes in time but leaves tasks behind; the layer's close is clean."""
    vanilla = await run_scenario(sc, patched=False, drain_timeout=DRAIN, close_timeout=CLOSE)
    assert vanilla.closed and vanilla.tasks_left > 0, vanilla
    out = await run_scenario(sc, patched=True, drain_timeout=DRAIN, close_timeout=CLOSE)
    assert out.clean and out.streams_open == 0, out
    assert out.ms <= CLOSE * 1000 + MARGIN_MS, out
