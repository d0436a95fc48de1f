"""Running one scenario: a real, roomless ``AgentSession`` (real Silero VAD, the fakes
for the models) started, driven until its fault is engaged, closed along the scenario's
close path, and measured.

The measurement is taken while a hung close is still running, so what it holds (provider
streams, tasks) is counted; only then is everything released and cancelled.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import Agent, AgentSession, stt
from livekit.agents.voice.events import CloseReason

import livekit_safeclose as lsc

from ...bounded_close import closing_of
from .._runs import LayerForRun, cancel_since, tasks_since
from ..fakes import DeadAudioOutput, FakeLLM, FakeSTT, FakeTTS, FastAudioOutput, SilenceInput
from ..features import close_transcript_wait, transcript_kwargs
from .agents import Ctx
from .catalogue import SCENARIOS, Scenario

#: the final-transcript wait the scenarios configure (upstream default: 2 s); short so a
#: silent fake STT does not dominate every measurement. One test keeps the default.
TRANSCRIPT_TIMEOUT = 0.3

#: the graceful bound of the scenarios' layer runs (the option's default is 30 s)
GRACEFUL_TIMEOUT = 2.0


def vanilla_limit(base: float = 1.0) -> float:
    """How long to wait before calling a vanilla close hung: ``base`` past what a healthy
    close takes here (a release whose close waits a fixed 2 s for the final transcript
    gets those 2 s on top of the configured wait)."""
    return base + max(0.0, close_transcript_wait(TRANSCRIPT_TIMEOUT) - TRANSCRIPT_TIMEOUT)


@dataclass
class Outcome:
    """What one run of a scenario observed."""

    scenario: str
    patched: bool
    closed: bool
    ms: float
    provider_open: int
    streams_open: int
    close_events: int
    tasks_left: int
    report: Any = None
    error: str = ""
    #: the scenario's own task outlives the close on purpose (``Scenario.leaves_task``)
    task_allowed: bool = False

    @property
    def clean(self) -> bool:
        """Closed, no provider connection, one close event, nothing left running."""
        left_ok = self.tasks_left == 0 or self.task_allowed
        return (
            self.closed and self.provider_open == 0 and self.close_events == 1 and not self.error and left_ok
        )


async def _close(ctx: Ctx, sc: Scenario) -> None:
    s = ctx.session
    assert s is not None
    if sc.id == "race-aclose-shutdown":
        s.shutdown(drain=False)
        await s.aclose()
    elif sc.id == "escalate-graceful":
        s.shutdown(drain=True)
        await asyncio.sleep(0.05)
        await s.aclose()
    elif sc.id.startswith("end-call"):
        await _closed_event(ctx)  # the tool asked for the close itself
    elif sc.path == "aclose":
        await s.aclose()
    elif sc.path in ("shutdown", "graceful"):
        s.shutdown(drain=sc.path == "graceful")
        await _closed_event(ctx)
    elif sc.path == "disconnect":
        # what room io does when the linked participant (a SIP caller) hangs up
        s._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
        await _closed_event(ctx)
    elif sc.path == "error":
        model = s.stt
        assert isinstance(model, stt.STT)
        err = stt.STTError(
            timestamp=time.time(), label="fake", error=RuntimeError("provider gone"), recoverable=False
        )
        for _ in range(s.conn_options.max_unrecoverable_errors + 1):
            model.emit("error", err)
        await _closed_event(ctx)


async def _closed_event(ctx: Ctx) -> None:
    """The end of the close a ``_close_soon`` path started: its close event (or, on vanilla,
    the end of upstream's closing task, if that comes first), then the end of the layer's
    close, whose report is published a moment after the event. A closing task that was
    already done is a stale one (upstream never resets it)."""
    session = ctx.session
    assert session is not None
    task = session._closing_task
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(ctx.extra["closed"].wait())}
    if task is not None and not task.done():
        waiters.add(task)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            if w is not task:
                w.cancel()
    close = closing_of(session, live_only=False)
    if close is not None and close.task is not None:
        await asyncio.wait({close.task})
    task = session._closing_task  # a close a timer started after the wait began
    if task is not None and not task.done():
        # a livekit-agents patched by `upstream diff`: its close ends with its closing task
        await asyncio.wait({task})


def make_session(
    ctx: Ctx,
    vad: Any = None,
    *,
    session_cls: type[AgentSession[Any]] = AgentSession,
    transcript_timeout: float = TRANSCRIPT_TIMEOUT,
    **kwargs: Any,
) -> AgentSession[Any]:
    """A roomless session on the fakes (and the real Silero VAD), wired to ``ctx``."""
    session: AgentSession[Any] = session_cls(
        stt=FakeSTT(ctx.ledger, **ctx.stt_kwargs),
        llm=FakeLLM(ctx.ledger, ctx.script, close_fault=ctx.llm_close_fault),
        tts=FakeTTS(ctx.ledger, **ctx.tts_kwargs),
        tools=ctx.session_tools,
        vad=vad if vad is not None else load_vad(),
        **transcript_kwargs(transcript_timeout),
        **kwargs,
    )
    session.input.audio = SilenceInput()
    session.output.audio = DeadAudioOutput() if ctx.dead_sink else FastAudioOutput()
    return session


_vad: Any = None


def load_vad() -> Any:
    """The real Silero VAD (its model ships in the wheel), loaded once per process."""
    global _vad
    if _vad is None:
        from livekit.plugins import silero

        _vad = silero.VAD.load()
    return _vad


@dataclass
class _Run:
    """One run's moving parts, so the finally of :func:`run_scenario` reaches them all."""

    sc: Scenario
    ctx: Ctx = field(default_factory=Ctx)
    closes: list[Any] = field(default_factory=list)
    #: start() still running when the close begins (``during_start`` scenarios)
    starter: asyncio.Future[None] | None = None
    closer: asyncio.Future[None] | None = None


async def _start_engaged(run: _Run) -> AgentSession[Any]:
    """Set the scenario up, start its session and wait until its fault is engaged."""
    sc, ctx = run.sc, run.ctx
    ctx.extra["closed"] = asyncio.Event()
    agent = await sc.setup(ctx)
    session = ctx.session = make_session(ctx)

    def _on_close(ev: Any) -> None:
        run.closes.append(ev)
        ctx.extra["closed"].set()

    session.on("close", _on_close)
    if sc.during_start:
        run.starter = asyncio.ensure_future(session.start(agent))
        await asyncio.wait_for(ctx.engaged.wait(), 5)
        return session
    await session.start(agent)
    if sc.restart:
        await _shut_down_and_restart(run, session, agent)
    if sc.trigger is not None:
        await sc.trigger(ctx)
    await asyncio.wait_for(ctx.engaged.wait(), 5)
    return session


async def _shut_down_and_restart(run: _Run, session: AgentSession[Any], agent: Agent) -> None:
    """Close through shutdown() (upstream never resets the closing task it sets), wait for
    that close to end, forget its close event and start the session again."""
    closed: asyncio.Event = run.ctx.extra["closed"]
    session.shutdown(drain=False)
    await asyncio.wait_for(closed.wait(), 5)
    while session._closing_task is not None and not session._closing_task.done():
        await asyncio.sleep(0.01)
    run.closes.clear()
    closed.clear()
    await session.start(agent)


async def _timed_close(run: _Run, limit: float) -> tuple[float, bool, str]:
    """Close along the scenario's path, waiting at most ``limit``: (ms, closed, error).
    A close still running at ``limit`` is left running for the measurement."""
    t0 = time.monotonic()
    closer = run.closer = asyncio.ensure_future(_close(run.ctx, run.sc))
    done, _ = await asyncio.wait({closer}, timeout=limit)
    ms = (time.monotonic() - t0) * 1000
    if not done:
        return ms, False, ""
    exc = closer.exception()
    return ms, exc is None, repr(exc) if exc is not None else ""


async def run_scenario(
    scenario: Scenario | str,
    *,
    patched: bool,
    drain_timeout: float = 0.5,
    close_timeout: float = 3.0,
    graceful_timeout: float = GRACEFUL_TIMEOUT,
    limit: float | None = None,
) -> Outcome:
    """Run one scenario in the current event loop and report what happened.

    ``patched`` installs the layer for the run (and restores the previous state after);
    ``limit`` is how long to wait for the close before calling it hung (default: the
    close bound, plus the graceful bound on the graceful path, plus one second when
    patched; one second on vanilla).
    """
    sc = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    if sc.schedule is not None:
        from ..fuzz.replay import scenario_outcome

        return await scenario_outcome(sc, patched=patched)
    layer = LayerForRun(
        patched, drain_timeout=drain_timeout, close_timeout=close_timeout, graceful_timeout=graceful_timeout
    )
    if limit is None:
        bound = close_timeout + (graceful_timeout if sc.path == "graceful" else 0.0)
        limit = bound + 1.0 if patched or not sc.vanilla_hangs else vanilla_limit()
    before = set(asyncio.all_tasks())
    run = _Run(sc)
    try:
        session = await _start_engaged(run)
        await asyncio.sleep(0.05)
        ms, closed, err = await _timed_close(run, limit)
        if run.starter is not None:
            await asyncio.wait({run.starter}, timeout=0.5)
        await asyncio.sleep(0)
        return Outcome(
            scenario=sc.id,
            patched=patched,
            closed=closed,
            ms=round(ms, 1),
            provider_open=run.ctx.ledger.open_count(),
            streams_open=lsc.open_streams(session)["total"] if patched else -1,
            close_events=len(run.closes),
            tasks_left=len(tasks_since(before)),
            report=lsc.last_close_report(session) if patched else None,
            error=err,
            task_allowed=sc.leaves_task,
        )
    finally:
        for undo in run.ctx.extra.pop("undo", []):
            undo()
        run.ctx.ledger.release()
        if run.closer is not None and not run.closer.done():
            run.closer.cancel()
        await cancel_since(before)
        layer.restore()
