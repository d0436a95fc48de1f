"""What a close keeps from upstream, and what it must never cut or miss."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.voice.events import CloseReason

import livekit_safeclose as lsc
from livekit_safeclose.testing._runs import close_ended
from livekit_safeclose.testing.fakes import FakeReply
from livekit_safeclose.testing.scenarios import Ctx, ScenarioAgent, make_session


async def _stuck_tool_session(ctx: Ctx, **kwargs: Any) -> tuple[AgentSession[Any], list[Any]]:
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    agent = ScenarioAgent(ctx, tool=kwargs.pop("tool", "park"))
    session = ctx.session = make_session(ctx, **kwargs)
    closes: list[Any] = []
    session.on("close", closes.append)
    await session.start(agent)
    session.generate_reply(user_input="look it up")
    await asyncio.wait_for(ctx.engaged.wait(), 5)
    return session, closes


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_transcript_wait_is_never_cut_by_the_drain_bound() -> None:
    """With upstream's default 2 s final-transcript wait and a tight close bound, the drain
    bound shrinks; the transcript wait keeps its 2 s and is not reported as stuck."""
    lsc.install(drain_timeout=3.0, close_timeout=3.0)
    ctx = Ctx()
    session, closes = await _stuck_tool_session(ctx, transcript_timeout=2.0)
    t0 = time.monotonic()
    await session.aclose()
    elapsed = time.monotonic() - t0
    report = lsc.last_close_report(session)
    assert report is not None
    steps = {s.name: s for s in report.steps}
    assert steps["activity.aclose"].ms >= 1900, report.steps
    assert steps["activity.aclose"].outcome == "done", report.steps
    assert elapsed <= 3.0 + 0.15
    assert all("commit_user_turn" not in s.name for s in report.stuck)
    assert ctx.ledger.open_count() == 0 and len(closes) == 1
    ctx.ledger.release()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_graceful_close_keeps_the_full_transcript_wait() -> None:
    lsc.install(drain_timeout=0.5, close_timeout=6.0)
    ctx = Ctx()
    session = ctx.session = make_session(ctx, transcript_timeout=2.0)
    closes: list[Any] = []
    session.on("close", closes.append)
    await session.start(ScenarioAgent(ctx))
    t0 = time.monotonic()
    session.shutdown(drain=True)
    while not closes:
        await asyncio.sleep(0.02)
    # the report is published when the close ends, a moment after the close event
    await close_ended(session)
    assert time.monotonic() - t0 >= 1.9
    report = lsc.last_close_report(session)
    assert report is not None and not report.forced, report.to_dict()
    assert [s.outcome for s in report.steps if s.name == "activity.aclose"] == ["done"], report.steps


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_final_user_transcript_is_committed_on_forced_close() -> None:
    """The caller's last words arrive during the close's transcript wait and land in the
    history, exactly as on a healthy upstream close."""
    lsc.install(drain_timeout=0.3, close_timeout=3.0)
    ctx = Ctx()
    ctx.stt_kwargs = {"transcript": "goodbye then", "final_on_flush": True}
    session, closes = await _stuck_tool_session(ctx, transcript_timeout=1.5)
    await session.aclose()
    texts = [getattr(item, "text_content", None) for item in session.history.items]
    assert any(t and "goodbye then" in t for t in texts), texts
    assert len(closes) == 1
    ctx.ledger.release()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_concurrent_closers_share_one_close_and_one_event() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=3.0)
    ctx = Ctx()
    session, closes = await _stuck_tool_session(ctx)
    session.shutdown(drain=False)
    task = session._closing_task
    await asyncio.gather(
        session.aclose(),
        session.aclose(),
        session._aclose_impl(reason=CloseReason.JOB_SHUTDOWN),  # the job's shutdown callback
    )
    session._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
    assert len(closes) == 1
    assert closes[0].reason == CloseReason.USER_INITIATED
    assert task is not None and task.done()
    assert session._closing_task is None  # reset, so a restarted session can close again
    ctx.ledger.release()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("patched", [True, False], ids=["layer", "vanilla"])
async def test_close_cancelled_from_outside_still_tears_down(patched: bool) -> None:
    """The job guards session.aclose() with asyncio.wait_for: when that wait is cancelled
    the layer's close goes on and closes the streams; vanilla leaves them open."""
    if patched:
        lsc.install(drain_timeout=0.3, close_timeout=2.0)
    ctx = Ctx()
    session, closes = await _stuck_tool_session(ctx)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(session.aclose(), timeout=0.1)
    deadline = time.monotonic() + (2.2 if patched else 1.0)
    # the streams end in the models phase, the close event a few loop turns after it
    while time.monotonic() < deadline and (ctx.ledger.open_count() > 0 or (patched and not closes)):
        await asyncio.sleep(0.02)
    if patched:
        assert ctx.ledger.open_count() == 0
        assert len(closes) == 1
    else:
        assert ctx.ledger.open_count() == 1, "vanilla closed the streams: the test does not bite"
        assert closes == []
    ctx.ledger.release()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_graceful_drain_still_waits_for_a_slow_tool() -> None:
    lsc.install(drain_timeout=0.2, close_timeout=1.0)
    ctx = Ctx()
    session, closes = await _stuck_tool_session(ctx, tool="sleep:1.5")
    t0 = time.monotonic()
    session.shutdown(drain=True)
    while not closes:
        await asyncio.sleep(0.02)
    # the report is published when the close ends, a moment after the close event
    await close_ended(session)
    assert time.monotonic() - t0 >= 1.4  # neither the drain nor the close bound cut it
    assert ctx.tool_finished.is_set()
    report = lsc.last_close_report(session)
    assert report is not None and not report.forced and report.drain_requested


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_handoff_still_waits_for_on_exit() -> None:
    """Agent handoffs are graceful: the old agent's slow on_exit runs to completion."""
    lsc.install(drain_timeout=0.2, close_timeout=2.0)
    ctx = Ctx()
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    exited = asyncio.Event()

    class SlowExit(ScenarioAgent):
        async def on_exit(self) -> None:
            await asyncio.sleep(0.8)
            exited.set()

    new = ScenarioAgent(ctx, label="new_agent")
    session = ctx.session = make_session(ctx)
    await session.start(SlowExit(ctx, handoff_to=new, label="old_agent"))
    t0 = time.monotonic()
    session.generate_reply(user_input="hand off")
    while session._activity is None or session._activity.agent is not new:
        await asyncio.sleep(0.02)
        assert time.monotonic() - t0 < 5
    assert exited.is_set() and time.monotonic() - t0 >= 0.8
    await session.aclose()
    report = lsc.last_close_report(session)
    assert report is not None and not report.forced, report.to_dict()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_restarted_session_can_be_shut_down_again() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    ctx = Ctx()
    session = ctx.session = make_session(ctx)
    closes: list[Any] = []
    session.on("close", closes.append)
    agent = ScenarioAgent(ctx)
    for round_ in (1, 2):
        await session.start(agent)
        session.shutdown(drain=False)
        while len(closes) < round_:
            await asyncio.sleep(0.02)
        while session._closing_task is not None:
            await asyncio.sleep(0.01)
    assert len(closes) == 2 and ctx.ledger.open_count() == 0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_report_names_the_stuck_tool_and_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    ctx = Ctx()
    session, _ = await _stuck_tool_session(ctx)
    with caplog.at_level(logging.WARNING, logger="livekit.agents.safeclose"):
        await session.aclose()
    report = lsc.last_close_report(session)
    assert report is not None and report.forced
    tool = [s for s in report.stuck if s.name.startswith("tool_exec_lookup")]
    assert tool, report.stuck
    # the stack ends where the tool is parked: Ctx.park, called from the tool
    assert any("/scenarios/" in line and "in park" in line for line in tool[0].stack), tool[0].stack
    assert any("in lookup" in line for line in tool[0].stack)
    assert any(n.startswith("tool_exec_lookup") for n in report.cancelled)
    assert "activity.aclose" in report.torn_down
    warnings = [r for r in caplog.records if r.name == "livekit.agents.safeclose"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].safeclose_report["session"] == report.session  # type: ignore[attr-defined]
    assert report.to_json().startswith("{")


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_clean_close_logs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    lsc.install()
    ctx = Ctx()
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx))
    with caplog.at_level(logging.WARNING, logger="livekit.agents.safeclose"):
        await session.aclose()
    assert not [r for r in caplog.records if r.name == "livekit.agents.safeclose"]
    report = lsc.last_close_report(session)
    assert report is not None and not report.forced and report.completed


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_healthy_close_costs_no_more_than_vanilla() -> None:
    """Generous same-run comparison; the precise ratio lives in benchmarks/."""

    async def one() -> float:
        ctx = Ctx()
        session = ctx.session = make_session(ctx)
        await session.start(ScenarioAgent(ctx))
        t0 = time.monotonic()
        await session.aclose()
        return time.monotonic() - t0

    vanilla = sorted([await one() for _ in range(3)])[1]
    lsc.install()
    layer = sorted([await one() for _ in range(3)])[1]
    assert layer <= vanilla + 0.1, (layer, vanilla)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_subclass_bounds_the_close_without_global_patch() -> None:
    ctx = Ctx()
    ctx.stt_kwargs = {"close_fault": "hang"}
    session = ctx.session = make_session(
        ctx, session_cls=lsc.AgentSession, drain_timeout=0.3, close_timeout=2.0
    )
    await session.start(ScenarioAgent(ctx))
    t0 = time.monotonic()
    await session.aclose()
    assert time.monotonic() - t0 <= 2.15
    assert not lsc.is_installed()
    assert ctx.ledger.open_count() == 0
    report = lsc.last_close_report(session)
    assert report is not None and report.streams_closed_by_force


def test_subclass_validates_its_options() -> None:
    with pytest.raises(ValueError):
        lsc.AgentSession(drain_timeout=5.0, close_timeout=1.0)
    with pytest.raises(TypeError):
        lsc.AgentSession(drain_timeout="soon")
