"""Regression tests for defects found in review (each failed before its fix)."""

from __future__ import annotations

import asyncio
import gc
import textwrap
import weakref
from typing import Any

import pytest

import livekit_safeclose as lsc
from livekit_safeclose.testing.scenarios import Ctx, ScenarioAgent, make_session

pytest_plugins = ["pytester"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("patched", [True, False], ids=["layer", "vanilla"])
async def test_a_task_that_closes_many_sessions_keeps_none_of_them_alive(patched: bool) -> None:
    """A manager loop closing sessions one after another must not pin them: the close used
    to add a done-callback capturing the session to the *calling* task (5 of 5 alive)."""
    if patched:
        lsc.install(drain_timeout=0.3, close_timeout=2.0)
    refs: list[weakref.ref[Any]] = []
    for _ in range(5):
        ctx = Ctx()
        session = make_session(ctx)
        await session.start(ScenarioAgent(ctx))
        await session.aclose()
        refs.append(weakref.ref(session))
        ctx.ledger.release()
        del session, ctx
    await asyncio.sleep(0.05)
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of 5 closed sessions still alive"


def test_fixture_keeps_the_users_install_options(pytester: pytest.Pytester) -> None:
    """The ``safeclose`` fixture used to restore only 3 of the options, re-installing the
    worker patches (``signal.signal``) in a suite that had chosen ``install(worker=False)``."""
    pytester.makeconftest(
        textwrap.dedent(
            """
            import livekit_safeclose

            livekit_safeclose.install(worker=False, drain_timeout=1.0, close_timeout=4.0)
            """
        )
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            import signal

            import pytest

            import livekit_safeclose

            ORIGINAL_SIGNAL = signal.signal


            @pytest.mark.safeclose(drain_timeout=0.5, close_timeout=3.0)
            def test_uses_fixture(safeclose):
                assert livekit_safeclose.installed_parts() == {"core", "stream_ledger"}
                assert signal.signal is ORIGINAL_SIGNAL


            def test_after():
                opts = livekit_safeclose.installed_options()
                assert opts is not None and opts.worker is False
                assert (opts.drain_timeout, opts.close_timeout) == (1.0, 4.0)
                assert signal.signal is ORIGINAL_SIGNAL
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-q")
    result.assert_outcomes(passed=2)


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_abandoned_step_ending_in_an_exception_is_not_reported_never_retrieved() -> None:
    """An abandoned step that raises later (a drain resumed on the fresh lock trips
    upstream's lock assertion) is in the report already: the loop must not also print
    "Task exception was never retrieved" for it."""
    import time

    from livekit_safeclose.close_bookkeeping import CloseBookkeeping

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))

    async def late_failure() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)
            raise AssertionError("resumed without the lock") from None

    try:
        book = CloseBookkeeping()
        task = asyncio.ensure_future(late_failure())
        await asyncio.sleep(0)
        book.abandon("activity.drain", task, time.monotonic())
        await asyncio.wait([task])
        book.pending.clear()
        del task
        gc.collect()
        assert not [c for c in reported if "never retrieved" in str(c.get("message"))]
    finally:
        loop.set_exception_handler(previous)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("patched", [True, False], ids=["layer", "vanilla"])
async def test_an_on_enter_the_drain_was_told_to_skip_does_not_outlive_the_close(patched: bool) -> None:
    """While an ``AgentTask`` runs, upstream marks the tasks waiting on it drain-blocked:
    the drain skips them and ``aclose`` does not cancel them. A close there ended cleanly
    by upstream's account, the layer skipped its leftover scan, and the agent's
    ``on_enter`` outlived the close (fuzz seed 7 #982, a race; here made deterministic by
    putting ``on_enter`` in upstream's drain-blocked set as the AgentTask's slot does)."""
    from livekit_safeclose.adapters import add_drain_blocked

    if patched:
        lsc.install(drain_timeout=0.3, close_timeout=2.0)
    ctx = Ctx()
    session = make_session(ctx)
    await session.start(ScenarioAgent(ctx, on_enter="park"))
    activity = session._activity
    assert activity is not None
    on_enter = next(t for t in activity._speech_tasks if t.get_name() == "AgentTask_on_enter")
    try:
        add_drain_blocked(activity, [on_enter])
        await asyncio.wait_for(session.aclose(), 1.5)
        await asyncio.sleep(0.05)
        # vanilla shows the bug: its close returns and the on_enter runs on
        assert on_enter.done() is patched, f"on_enter done after the close: {on_enter.done()}"
    finally:
        ctx.ledger.release()
        on_enter.cancel()


def _pending_backchannel_timers() -> int:
    loop: Any = asyncio.get_running_loop()
    return sum(
        1
        for h in loop._scheduled
        if not h.cancelled() and getattr(h._callback, "__name__", "") == "_on_backchannel_boundary_done"
    )


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("disarm", [True, False], ids=["layer", "layer-without-disarm"])
async def test_a_speech_that_starts_playout_after_the_close_leaves_no_backchannel_timer(
    disarm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fuzz 10k #7654: upstream arms the recognition's backchannel-boundary timer (1 s) when
    playout starts and cancels it only at the end of the recognition's close. A speech task
    the forced close cancelled but that unwinds past the close (here: a tool that starts
    playout on its way out, as a late first frame does) armed it on the closed activity, where
    it fired a second later. The layer cancels it when such a task ends. Vanilla waits for
    every speech task before it closes the recognition, so the race is the layer's own: the
    proof of failure is the layer without the disarm."""
    from livekit.agents import function_tool

    from livekit_safeclose import completion
    from livekit_safeclose.testing.fakes import FakeReply

    if not disarm:
        monkeypatch.setattr(completion, "disarm_recognitions", lambda _acts: None)
    lsc.install(drain_timeout=0.2, close_timeout=1.0)
    ctx = Ctx()
    ended = asyncio.Event()

    @function_tool
    async def late_playout() -> str:
        """Play something."""
        ctx.engaged.set()
        try:
            await asyncio.Event().wait()
        finally:
            # unwinds past the close's grace, then playout starts (a first frame, late)
            await asyncio.shield(asyncio.sleep(0.7))
            recognition._on_start_of_agent_speech(started_at=0.0)
            ended.set()
        return "never"

    ctx.session_tools = [late_playout]
    ctx.script = [FakeReply(tool_calls=[("late_playout", {})])]
    session = make_session(ctx)
    await session.start(ScenarioAgent(ctx))
    recognition = session._activity._audio_recognition
    session.generate_reply(user_input="look it up")
    await asyncio.wait_for(ctx.engaged.wait(), 5)
    await asyncio.wait_for(session.aclose(), 3)
    await asyncio.wait_for(ended.wait(), 3)
    await asyncio.sleep(0)
    pending = _pending_backchannel_timers()
    ctx.ledger.release()
    if disarm:
        assert pending == 0, "the closed activity kept a backchannel timer"
    else:
        assert pending == 1  # the failure the disarm prevents


def _pending_user_away_timers(session: Any) -> int:
    """Upstream's user-away timer (``call_later(..., session._update_user_state, "away")``)."""
    loop = asyncio.get_running_loop()
    away = session._update_user_state
    return sum(1 for h in getattr(loop, "_scheduled", []) if not h.cancelled() and h._callback == away)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("done_too", [True, False], ids=["layer", "layer-skipping-done-tasks"])
async def test_a_cancelled_task_whose_done_callbacks_are_queued_leaves_no_user_away_timer(
    done_too: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fuzz 10k #6959: a task the forced close cancelled can be done by the time the close
    ends while upstream's done callbacks for it are still queued (a reply cancelled before its
    tool started ends on its first step). The pipeline-reply callback then sets the agent
    state listening on the closed session, which arms the user-away timer after the close
    disarmed it. The layer disarmed only tasks not yet done; it now also waits out the queued
    callbacks of done ones (one call scheduled at the close's end runs after them). Vanilla waits for
    every speech task before its close cancels the timer, and on the fuzz schedule never closes
    (``fuzz-zombie-tools-queued-reply-end``): the race is the layer's forced close, so the proof
    of failure is the layer with the old filter restored."""
    from livekit_safeclose import completion
    from livekit_safeclose.bounded_close import closing_of

    if not done_too:
        real = completion.disarm_when_done
        monkeypatch.setattr(
            completion,
            "disarm_when_done",
            lambda s, tasks, acts=(): real(s, [t for t in tasks if not t.done()], acts),
        )
    lsc.install(drain_timeout=0.2, close_timeout=1.0)
    ctx = Ctx()
    session = make_session(ctx)
    await session.start(ScenarioAgent(ctx, on_enter="park"))  # the close forces it
    activity = session._activity
    await asyncio.wait_for(session.aclose(), 3)
    close = closing_of(session, live_only=False)
    assert close is not None and close.forced and _pending_user_away_timers(session) == 0

    async def _reply() -> None:
        return None

    # a reply the close cancelled, as it stands when the close ends: done, upstream's
    # callback queued behind its last step
    reply = asyncio.ensure_future(_reply())
    reply.add_done_callback(activity._on_pipeline_reply_done)
    session._agent_state = "speaking"
    await asyncio.sleep(0)
    assert reply.done()
    close.cancelled_tasks.add(reply)
    completion.disarm_closed(session, close)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    pending = _pending_user_away_timers(session)
    ctx.ledger.release()
    if done_too:
        assert pending == 0, "the closed session kept its user-away timer"
    else:
        assert pending == 1  # the failure the fix prevents
