"""AgentSession side of the close: one shared closing task, a bounded drain, and a
teardown whose every step shares one deadline.

Upstream (1.8.x) awaits ``AgentActivity.drain()`` without a bound on every close path, so
one speech task that never settles keeps the session, and its provider streams, open
forever. The functions below are written as the bodies of the upstream methods they
replace (same names), so the layer doubles as the prototype of an upstream fix.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from livekit.agents.voice.agent import AgentTask, _get_activity_task_info
from livekit.agents.voice.agent_activity import AgentActivity, _AgentActivityContextVar
from livekit.agents.voice.agent_session import AgentSession as _UpstreamAgentSession
from livekit.agents.voice.events import CloseReason

from . import activity as activity_mod
from . import report as report_mod
from . import streams as streams_mod
from ._run import UNWIND_GRACE, CloseRun, Options
from .report import logger, stuck_task

Session = _UpstreamAgentSession[Any]

#: the upstream methods this module replaces, captured before any patching
UPSTREAM: dict[str, Any] = {
    name: _UpstreamAgentSession.__dict__[name]
    for name in ("_aclose_impl", "_close_soon", "_teardown_activity")
}

#: process-wide options set by ``install()``; ``None`` while not installed
_installed_options: Options | None = None


def set_installed_options(options: Options | None) -> None:
    global _installed_options
    _installed_options = options


def options_for(session: Session) -> Options | None:
    """Per-session options (the subclass) win over the process-wide ones."""
    own: Options | None = session.__dict__.get("_safeclose_options")
    return own if own is not None else _installed_options


def _label(session: Session) -> str:
    agent = session.__dict__.get("_agent")
    name = getattr(agent, "label", None) or type(agent).__name__ if agent is not None else "-"
    return f"AgentSession@{id(session):x}[{name}]"


def _run_of(session: Session) -> CloseRun | None:
    run: CloseRun | None = session.__dict__.get("_safeclose_run")
    return run


def _stt_stream(activity: AgentActivity | None) -> Any:
    recog = getattr(activity, "_audio_recognition", None)
    pipeline = getattr(recog, "_stt_pipeline", None)
    return getattr(pipeline, "_recognize_stream", None)


def _chain(session: Session) -> list[AgentActivity]:
    """The current activity and, for an AgentTask, the parents it returns to."""
    out: list[AgentActivity] = []
    act = session._activity
    while act is not None and act not in out:
        out.append(act)
        agent = act.agent
        old = agent._old_agent if isinstance(agent, AgentTask) else None
        act = old._activity if old is not None else None
    if session._next_activity is not None and session._next_activity not in out:
        out.append(session._next_activity)
    return out


def _ensure_closing_task(
    session: Session, options: Options, *, reason: CloseReason, drain: bool, error: Any
) -> asyncio.Task[None]:
    """Start the session's one closing task, or join (and, if forced, escalate) it."""
    run = _run_of(session)
    if run is not None and run.task is not None and not run.task.done():
        if not drain:
            run.escalate()
        return run.task
    run = CloseRun(
        session_label=_label(session),
        options=options,
        reason=reason.value,
        drain=drain,
        transcript_timeout=float(session._opts.session_close_transcript_timeout),
    )
    session.__dict__["_safeclose_run"] = run
    task = asyncio.create_task(
        _closing_main(session, run, reason=reason, drain=drain, error=error),
        name="AgentSession._closing_task",
    )
    run.task = task
    session._closing_task = task

    def _reset(t: asyncio.Task[None]) -> None:
        # upstream never resets it, so a restarted session could not be shut down again
        if session._closing_task is t:
            session._closing_task = None

    task.add_done_callback(_reset)
    return task


def _nothing_to_close(session: Session) -> bool:
    """Never started, or already closed, and not starting: upstream's close is a no-op
    there, and a new closing task would only overwrite the last close's report."""
    return not session._started and session._activity is None and not session._lock.locked()


def _exempt_caller(session: Session, run: CloseRun) -> None:
    """A tool (or speech) awaiting the close must not be waited for by the close: that
    is an await cycle. Upstream's drain-blocked set is made for exactly this."""
    me = asyncio.current_task()
    if me is None or me is run.task:
        return
    run.waiters.add(me)
    activity = _AgentActivityContextVar.get(None)
    if activity is not None and activity._session is session and not activity._closed:
        activity._add_drain_blocked_tasks([me])


async def _aclose_impl(
    self: Session,
    *,
    reason: CloseReason,
    drain: bool = False,
    error: Any = None,
) -> None:
    """Replaces ``AgentSession._aclose_impl``: every close path (``aclose()``,
    ``shutdown()``, close-on-disconnect, error close, job shutdown) joins one shared
    closing task. Callers await it shielded, so a caller cancelled from outside (the job's
    ``wait_for`` guard) or a tool awaiting its own session's close cannot cancel the close."""
    options = options_for(self)
    if options is None:
        await UPSTREAM["_aclose_impl"](self, reason=reason, drain=drain, error=error)
        return
    run = _run_of(self)
    if _nothing_to_close(self) and (run is None or run.task is None or run.task.done()):
        return
    task = _ensure_closing_task(self, options, reason=reason, drain=drain, error=error)
    run = _run_of(self)
    assert run is not None
    _exempt_caller(self, run)
    me = asyncio.current_task()
    try:
        await asyncio.shield(task)
    finally:
        if me is not None:
            run.waiters.discard(me)
            # a tool that awaited the close resumes after it; the end of its speech re-arms
            # upstream's user-away timer on the closed session, which would pin it for 15 s
            info = _get_activity_task_info(me)
            handle = info.speech_handle if info is not None else None
            for t in [me, *(handle._tasks if handle is not None else [])]:
                t.add_done_callback(lambda _: _disarm_after_close(self))


def _disarm_after_close(session: Session) -> None:
    if not session._started:
        session._cancel_user_away_timer()


def _close_soon(
    self: Session,
    *,
    reason: CloseReason,
    drain: bool = False,
    error: Any = None,
) -> None:
    """Replaces ``AgentSession._close_soon``: starts the shared close (or escalates a
    graceful one when this request is forced) and returns at once."""
    options = options_for(self)
    if options is None:
        UPSTREAM["_close_soon"](self, reason=reason, drain=drain, error=error)
        return
    run = _run_of(self)
    if _nothing_to_close(self) and (run is None or run.task is None or run.task.done()):
        return
    _ensure_closing_task(self, options, reason=reason, drain=drain, error=error)


def _start_tasks(session: Session) -> list[asyncio.Task[Any]]:
    """The tasks ``start()`` is waiting on: the first ``_update_activity_task`` (toolset
    setup, activity start) of this session, found by walking each task's await chain."""
    out: list[asyncio.Task[Any]] = []
    for task in asyncio.all_tasks():
        if task.done():
            continue
        obj: Any = task.get_coro()
        for _ in range(16):
            frame = getattr(obj, "cr_frame", None)
            if frame is None:
                break
            if frame.f_code.co_name == "_update_activity_task" and frame.f_locals.get("self") is session:
                out.append(task)
                break
            obj = getattr(obj, "cr_await", None)
    return out


async def _wait_lock_free(lock: asyncio.Lock, run: CloseRun, phase: str) -> bool:
    acq = asyncio.ensure_future(lock.acquire())
    ok = await run.wait_phase(acq, phase)
    if ok and not acq.cancelled() and acq.exception() is None:
        lock.release()
        return True
    acq.cancel()
    await asyncio.wait({acq})
    if not acq.cancelled() and acq.exception() is None:
        lock.release()
        return True
    return False


async def _wait_for_start(session: Session, run: CloseRun) -> None:
    """Closing while ``start()`` holds the session lock (toolset setup, ``on_enter`` of a
    captured run): wait within the drain bound, then cancel what start() waits on."""
    lock = session._lock
    if not lock.locked() or await _wait_lock_free(lock, run, "drain"):
        return
    stuck = _start_tasks(session)
    run.report.forced = True
    run.report.stuck.extend(stuck_task(t) for t in stuck)
    for t in stuck:
        t.cancel()
    run.note_cancelled(stuck)
    for act in _chain(session):
        run.note_cancelled(activity_mod._force_cancel_speech_tasks(act, spare=run.waiters))
    run.record("session.start", 0.0, "timeout", "start() still running at the drain bound")
    run.drain_deadline = min(run.drain_deadline, time.monotonic() + UNWIND_GRACE)
    await _wait_lock_free(lock, run, "drain")


async def _closing_main(
    session: Session, run: CloseRun, *, reason: CloseReason, drain: bool, error: Any
) -> None:
    """The body of the shared closing task: upstream's close, watched by the close bound,
    with the stream sweep and the report in a ``finally``."""
    inner: asyncio.Future[None] | None = None
    activities = run.activities = _chain(session)
    for act in activities:
        if (s := _stt_stream(act)) is not None:
            streams_mod.adopt(s, session)
    try:
        await _wait_for_start(session, run)
        activities += [a for a in _chain(session) if a not in activities]
        inner = asyncio.ensure_future(
            UPSTREAM["_aclose_impl"](session, reason=reason, drain=drain, error=error)
        )
        if not await run.wait_phase(inner, "inner"):
            run.report.stuck.append(stuck_task(inner))  # type: ignore[arg-type]
            inner.cancel()
            run.report.abandoned.append("AgentSession._aclose_impl")
            run.report.forced = True
        elif not inner.cancelled() and (exc := inner.exception()) is not None:
            logger.error("error while closing the session", exc_info=exc)
    finally:
        await asyncio.shield(_finish(session, run, activities, inner))


async def _finish(
    session: Session,
    run: CloseRun,
    activities: list[AgentActivity],
    inner: asyncio.Future[None] | None,
) -> None:
    """Close whatever the close left open (bounded), stop the session's streams that are
    still open, cancel the steps that never finished, then publish the report."""
    for act in activities + [a for a in _chain(session) if a not in activities]:
        if not act._closed:
            run.graceful = False
            await activity_mod.aclose_forced(act, run)
    for act in activities:
        if (s := _stt_stream(act)) is not None:
            streams_mod.adopt(s, session)
    end = run.close_deadline if not math.isinf(run.close_deadline) else time.monotonic() + UNWIND_GRACE
    if run.options.close_models:
        await _close_owned_models(session, run, activities)
    await run.sweep_streams(session, end)
    pending = [t for t in run.pending if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=run.left(min(end, time.monotonic() + UNWIND_GRACE)))
        for t in pending:
            t.cancel()
    run.streams_left_open(session)
    run.report.completed = inner is not None and inner.done() and not inner.cancelled()
    run.report.duration_ms = round((time.monotonic() - run.t0) * 1000, 1)
    report_mod.emit(session, run.report)


def _models_of(holder: Any) -> list[Any]:
    return [m for m in (holder.stt, holder.llm, holder.tts) if m is not None and not isinstance(m, str)]


async def _close_owned_models(session: Session, run: CloseRun, activities: list[AgentActivity]) -> None:
    """``close_models=True``: close the model instances this session used (the pooled
    inference TTS websockets live until ``tts.aclose()``), except any that another running
    session also uses. Bounded like every other step."""
    mine = {id(m): m for holder in [session, *activities] for m in _models_of(holder)}
    for other in streams_mod.known_sessions():
        if other is not session and other._started:
            for m in _models_of(other):
                mine.pop(id(m), None)
    if mine:
        await run.step(
            "models.aclose",
            asyncio.gather(*(m.aclose() for m in mine.values()), return_exceptions=True),
            deadline=min(run.inner_deadline(), time.monotonic() + UNWIND_GRACE * 2),
        )


async def _drain(session: Session, run: CloseRun, activity: AgentActivity) -> None:
    """``activity.drain()``, bounded by the drain deadline when forced. On the bound the
    stuck tasks are recorded and force-cancelled without the activity lock, so ``drain()``
    unwinds and releases it; if it still does not, it is abandoned."""
    start = time.monotonic()
    task = asyncio.ensure_future(activity.drain())
    if await run.wait_phase(task, "drain"):
        outcome = "done" if task.cancelled() or task.exception() is None else "error"
        run.record("activity.drain", (time.monotonic() - start) * 1000, outcome)
        return
    _force(run, activity)
    run.record("activity.drain", (time.monotonic() - start) * 1000, "timeout")
    if not await run.wait(task, min(run.steps_deadline(), time.monotonic() + UNWIND_GRACE)):
        run.mark_zombies([t for t in run.forced_tasks if not t.done()])
        run.report.abandoned.append("activity.drain")
        run.report.stuck.append(stuck_task(task))
        run.pending.append(task)
        run.lock_abandoned = True


def _force(run: CloseRun, activity: AgentActivity) -> None:
    stuck = activity_mod.unsettled_tasks(activity, run.waiters)
    run.report.stuck.extend(stuck_task(t) for t in stuck)
    run.report.forced = True
    cancelled = activity_mod._force_cancel_speech_tasks(activity, spare=run.waiters)
    run.forced_tasks.extend(cancelled)
    run.note_cancelled(cancelled)


async def _await_handle(handle: Any) -> None:
    await handle


async def _teardown_activity(self: Session, *, reason: CloseReason, drain: bool) -> None:
    """Replaces ``AgentSession._teardown_activity``.

    Same steps in the same order. A graceful close waits for speech as upstream does
    (unless a forced close joins it); a forced close gives speech, tools and ``on_exit``
    ``drain_timeout`` to settle, then force-cancels them. Every later wait (the models,
    forwarding tasks, recorder, IVR, toolsets) is bounded by the same close deadline, and
    the final user transcript keeps its full ``session_close_transcript_timeout``.
    """
    run = _run_of(self)
    if run is None or run.task is None or run.task.done() or options_for(self) is None:
        await UPSTREAM["_teardown_activity"](self, reason=reason, drain=drain)
        return

    self._closing = True
    self._cancel_user_away_timer()
    self._on_aec_warmup_expired()
    if self._amd is not None:
        await run.step("amd.aclose", self._amd.aclose())
        self._amd = None

    activity = self._activity
    left_behind: list[AgentActivity] = []
    chain_cancelled = False
    while activity is not None and isinstance(agent_task := activity.agent, AgentTask):
        parent_interrupt: asyncio.Future[None] | None = None
        if run.graceful:
            # let the task finish what it queued (the goodbye of a tool that shut down)
            await _drain(self, run, activity)
            chain_cancelled = chain_cancelled or not agent_task.done()
            parent = agent_task._old_agent
            if chain_cancelled and parent is not None and parent._activity is not None:
                parent_interrupt = parent._activity.interrupt(force=True)
        agent_task.cancel()
        inactive = asyncio.ensure_future(agent_task._wait_for_inactive())
        if not await run.wait_phase(inactive, "drain"):
            # the task's on_exit, or the parent's resume, is stuck: stop it and close the
            # task's activity ourselves, since the handoff back will not
            inactive.cancel()
            _force(run, activity)
            left_behind.append(activity)
            run.record("agent_task.wait_for_inactive", 0.0, "timeout", agent_task.label)
        if parent_interrupt is not None:
            await run.wait_phase(parent_interrupt, "drain")
        parent = agent_task._old_agent
        if parent is None:
            break
        activity = parent._activity

    if activity is not None:
        if not run.graceful:
            try:
                activity.interrupt(force=True)
            except RuntimeError:
                pass  # uninterruptible speech: the drain bound covers it
        await _drain(self, run, activity)

        speech = activity.current_speech
        if speech is not None and not speech.done():
            waited = asyncio.ensure_future(_await_handle(speech))
            if not await run.wait_phase(waited, "drain"):
                waited.cancel()
                _force(run, activity)
        run.graceful_drain_done()

        self.input.audio = None
        self.input.video = None
        self.output.audio = None
        self.output.transcription = None

        if reason != CloseReason.ERROR and (recog := activity._audio_recognition) is not None:
            # the final user transcript: a healthy part of the close, never cut to meet
            # the drain bound (it was budgeted inside close_timeout)
            recog._commit_user_turn(
                audio_detached=True,
                transcript_timeout=self._opts.session_close_transcript_timeout,
            )

        if run.graceful:
            # a graceful close keeps upstream's aclose (it still awaits background tools and
            # the final transcript) with the whole close bound, not one step's allowance
            await run.step(
                "activity.aclose", activity_mod.UPSTREAM_ACLOSE(activity), deadline=run.steps_deadline()
            )
            if not activity._closed or run.report.abandoned[-1:] == ["activity.aclose"]:
                run.graceful = False
                await activity_mod.aclose_forced(activity, run, again=True)
        else:
            await activity_mod.aclose_forced(activity, run)
    else:
        run.graceful_drain_done()
    self._activity = None

    for act in left_behind:
        await activity_mod.aclose_forced(act, run)

    for span_attr in ("_agent_speaking_span", "_user_speaking_span"):
        span = getattr(self, span_attr)
        if span is not None:
            span.end()
            setattr(self, span_attr, None)

    forwards = [t for t in (self._forward_audio_atask, self._forward_video_atask) if t is not None]
    await run.cancel_and_settle("forward_io.cancel", forwards)

    if self._recorder_io:
        await run.step("recorder_io.aclose", self._recorder_io.aclose())
    if self._ivr_activity is not None:
        await run.step("ivr_activity.aclose", self._ivr_activity.aclose())

    from livekit.agents import llm

    toolsets = [tool for tool in self._tools if isinstance(tool, llm.Toolset)]
    if toolsets:
        await run.step(
            "session_toolsets.aclose",
            asyncio.gather(*(ts.aclose() for ts in toolsets), return_exceptions=True),
        )


class AgentSession(_UpstreamAgentSession[Any]):
    """Drop-in ``AgentSession`` with the bounded close, for code that prefers no global
    patch. Takes the same two options as :func:`livekit_safeclose.install`."""

    def __init__(
        self, *args: Any, drain_timeout: float = 5.0, close_timeout: float = 10.0, **kwargs: Any
    ) -> None:
        options = Options.validated(drain_timeout, close_timeout)
        super().__init__(*args, **kwargs)
        self.__dict__["_safeclose_options"] = options

    _aclose_impl = _aclose_impl
    _close_soon = _close_soon
    _teardown_activity = _teardown_activity
