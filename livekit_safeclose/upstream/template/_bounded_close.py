"""Bounded, complete close of an ``AgentSession``.

Before this module, every close path (``aclose()``, ``shutdown()``, close-on-disconnect, the
error close) awaited ``AgentActivity.drain()`` and ``aclose()`` without a bound: one speech
task, tool or hook that never settles, or one provider stream whose close waits for a
goodbye, kept the session and its provider connections open forever, and the ``close``
event never came.

Every close path joins one closing task per session, which runs the close unchanged and
watches it (what works for the session, and how it is cancelled: ``_bounded_close_tasks``):

* a forced close waits for the speech, tools and hooks at most ``DRAIN_TIMEOUT``; then
  they are cancelled without taking the activity lock (the drain holds it while it waits on
  exactly them); one that swallows the cancellation is taken out of the bookkeeping;
* the models are closed even when a stream's close hangs (its task is cancelled again);
* the whole forced close takes at most ``CLOSE_TIMEOUT``; a graceful close
  (``shutdown(drain=True)``) waits for its goodbye at most ``GRACEFUL_TIMEOUT``, then it is
  forced;
* whatever the close did not reach is completed: the ``close`` event is emitted exactly
  once, and the tasks that still work for the session are cancelled.

A healthy close is unchanged: graceful drains, the final-transcript wait, the close event."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import _bounded_close_tasks as _tasks

#: a forced close: how long the speech, tools and hooks may take before they are cancelled
DRAIN_TIMEOUT = 5.0
#: a forced close: the bound of the whole close
CLOSE_TIMEOUT = 10.0
#: ``shutdown(drain=True)``: how long the goodbye may take before the close is forced
GRACEFUL_TIMEOUT = 30.0
#: how long a cancelled task gets to unwind (at most a tenth of ``CLOSE_TIMEOUT``)
UNWIND_GRACE = 0.5
#: how long a model close may take past the final-transcript wait before its streams are stopped
MODEL_CLOSE_ALLOWANCE = 1.0

_STATE = "_bounded_close_state"

Unbounded = Callable[..., Coroutine[Any, Any, Any]]


def _grace() -> float:
    return min(UNWIND_GRACE, CLOSE_TIMEOUT / 10)


class _Close:
    """One close in flight: its deadlines and what it cancelled."""

    def __init__(self, graceful: bool, transcript_timeout: float) -> None:
        self.t0 = time.monotonic()
        self.forced_at: float | None = None if graceful else self.t0
        self.transcript_timeout = transcript_timeout
        self.task: asyncio.Task[None] | None = None
        self.upstream: asyncio.Future[Any] | None = None
        self.escalated = asyncio.Event()
        self.cancelled: set[asyncio.Task[Any]] = set()
        self.zombies: set[asyncio.Task[Any]] = set()
        self.waiters: set[asyncio.Task[Any]] = set()
        self.activities: list[Any] = []
        self.owned: list[Any] = []  # objects whose tasks work for the session
        self.held_lock: set[int] = set()  # activities whose lock an abandoned drain keeps
        self.closing: set[int] = set()  # activities whose aclose began and did not finish
        self.was_started = False
        self.close_emitted = False
        self.ended = False
        self._timer = (
            asyncio.get_running_loop().call_later(GRACEFUL_TIMEOUT, self.escalate) if graceful else None
        )
        if not graceful:
            self.escalated.set()

    def escalate(self) -> None:
        """A forced close joined a graceful one, or ``GRACEFUL_TIMEOUT`` passed."""
        if self.forced_at is None:
            self.forced_at = time.monotonic()
            self.escalated.set()
        if self._timer is not None:
            self._timer.cancel()

    def drain_deadline(self) -> float:
        return math.inf if self.forced_at is None else self.forced_at + DRAIN_TIMEOUT

    def close_deadline(self, reserve: float = 0.0) -> float:
        return math.inf if self.forced_at is None else self.forced_at + CLOSE_TIMEOUT - reserve

    async def wait(self, fut: asyncio.Future[Any], deadline: Callable[[], float]) -> bool:
        """Wait for ``fut`` until ``deadline()`` (read again when the close escalates)."""
        while not fut.done():
            left = deadline() - time.monotonic()
            if left <= 0:
                return False
            esc = None if self.escalated.is_set() else asyncio.ensure_future(self.escalated.wait())
            try:
                await asyncio.wait(
                    {fut} if esc is None else {fut, esc},
                    timeout=None if math.isinf(left) else left,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                if esc is not None:
                    esc.cancel()
        return True

    async def wait_for(self, fut: asyncio.Future[Any], seconds: float) -> bool:
        end = time.monotonic() + seconds
        return await self.wait(fut, lambda: end)

    def cancel(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel each task once; the close's waiters (a tool awaiting it) are spared."""
        for t in tasks:
            if not t.done() and t not in self.waiters and t not in self.cancelled:
                self.cancelled.add(t)
                t.cancel()

    def note(self, activity: Any) -> None:
        if activity not in self.activities:
            self.activities.append(activity)


def _closing_of(session: Any) -> _Close | None:
    close: _Close | None = session.__dict__.get(_STATE)
    return close if close is not None and not close.ended else None


# -- AgentActivity ------------------------------------------------------------------------


async def drain_activity(activity: Any, unbounded: Unbounded, **kwargs: Any) -> Any:
    """``AgentActivity.drain``: while the session closes, bounded by the drain deadline, then
    the tasks it waits on are cancelled lock-free and their cancellation absorbed."""
    close = _closing_of(activity._session)
    if close is None:
        return await unbounded(**kwargs)
    close.note(activity)
    inner = asyncio.ensure_future(unbounded(**kwargs))
    forced = False
    try:
        if not await close.wait(inner, close.drain_deadline):
            forced = True
            _tasks.force(close, activity)
            if not await close.wait_for(inner, _grace()):
                _tasks.quarantine(close, activity)
                await close.wait_for(inner, _grace())
    except asyncio.CancelledError:
        inner.cancel()
        raise
    if forced:
        # cancelled in on_exit, the drain never paused scheduling: the close's last user
        # turn must land in the history, not start a reply
        activity._scheduling_paused = True
    if not inner.done():
        close.held_lock.add(id(activity))  # a zombie keeps the drain parked, with the lock
        return None
    if inner.cancelled() or (forced and inner.exception() is not None):
        return None
    return inner.result()


async def close_activity(activity: Any, unbounded: Unbounded) -> None:
    """``AgentActivity.aclose``: when the close is forced, every tool is cancelled first, the close is
    bounded, and a model close that waits on its provider has its streams stopped."""
    session = activity._session
    _tasks.spare_own_tool(activity)
    close = _closing_of(session)
    if close is None or activity._closed:
        await unbounded()
        return
    if close.forced_at is None and asyncio.current_task() is not close.upstream:
        await unbounded()  # a handoff during a graceful close
        return
    close.note(activity)
    close.closing.add(id(activity))
    if close.forced_at is not None:
        # a share of what is left, not a whole grace: a zombie tool the drain already forced
        # must not eat the time the activity's own close needs
        share = max(0.0, close.close_deadline() - time.monotonic()) / 4
        await _tasks.settle(close, _tasks.tool_tasks(activity), min(_grace(), share))
        _tasks.quarantine(close, activity)
        _tasks.forget_tools(activity, close.waiters)  # a tool awaiting the close finishes after it
    if id(activity) in close.held_lock or (activity._lock.locked() and close.forced_at is not None):
        activity._lock = asyncio.Lock()  # held by a drain parked on a zombie
    start = time.monotonic()
    inner = asyncio.ensure_future(unbounded())
    try:
        sweep_at = start + close.transcript_timeout + MODEL_CLOSE_ALLOWANCE

        def last() -> float:  # read again: a graceful close gets its bound when it escalates
            return close.close_deadline(reserve=3 * _grace())

        if not await close.wait(inner, lambda: min(sweep_at, last()) if close.forced_at else math.inf):
            await _tasks.sweep_streams(session, close, min(time.monotonic() + _grace(), last()))
            if not await close.wait(inner, lambda: max(last(), time.monotonic())):
                inner.cancel()
                await asyncio.wait({inner}, timeout=_grace())
    except asyncio.CancelledError:
        inner.cancel()
        raise
    if inner.cancelled() or inner.exception() is not None or not activity._closed:
        await _complete_activity(close, activity)
    close.closing.discard(id(activity))


async def _complete_activity(close: _Close, activity: Any) -> None:
    """What an interrupted ``aclose`` did not reach: the audio recognition (the STT
    stream), the activity's own tasks, the agent's link to it."""
    activity._closed = True
    recognition = activity._audio_recognition
    if recognition is not None:
        step = asyncio.ensure_future(recognition._aclose())
        if not await close.wait_for(step, _grace()):
            step.cancel()
    rest = _tasks.unsettled(activity)
    if (sched := activity._scheduling_atask) is not None:
        rest.append(sched)
    await _tasks.settle(close, rest, _grace())
    if activity.agent._activity is activity:
        activity.agent._activity = None


# -- AgentSession -------------------------------------------------------------------------


def close_soon(session: Any, unbounded: Callable[..., None], *, reason: Any, drain: bool, error: Any) -> None:
    """``AgentSession._close_soon``: a forced request escalates a graceful close in flight,
    and a closing task that already ended no longer blocks a later close (a restart)."""
    close = _closing_of(session)
    if close is not None and not drain:
        close.escalate()
    if session._closing_task is not None and session._closing_task.done():
        session._closing_task = None
    unbounded(reason=reason, drain=drain, error=error)


async def close_session(session: Any, unbounded: Unbounded, *, reason: Any, drain: bool, error: Any) -> None:
    """``AgentSession._aclose_impl``: every close path joins one closing task, awaited
    shielded (a caller cancelled from outside cannot cut it)."""
    close = _closing_of(session)
    if close is None:
        if not session._started and session._activity is None and not session._lock.locked():
            return  # never started, or closed already
        close = _Close(graceful=drain, transcript_timeout=session._opts.session_close_transcript_timeout)
        close.was_started = bool(session._started) or session._lock.locked()
        session.__dict__[_STATE] = close
        close.owned += _tasks.outputs(session)
        close.task = asyncio.create_task(
            _run(session, close, unbounded, reason=reason, drain=drain, error=error),
            name="AgentSession.close",
        )
    elif not drain:
        close.escalate()
    assert close.task is not None
    me = asyncio.current_task()
    _tasks.exempt(session, close, me)
    try:
        await asyncio.shield(close.task)
    finally:
        if me is not None:
            close.waiters.discard(me)


async def _run(
    session: Any, close: _Close, unbounded: Unbounded, *, reason: Any, drain: bool, error: Any
) -> None:
    """The closing task: the close, watched, then completed whatever it reached."""

    def on_close(_: Any) -> None:
        close.close_emitted = True

    session.on("close", on_close)
    try:
        await _wait_for_start(session, close)
        close.upstream = asyncio.ensure_future(unbounded(reason=reason, drain=drain, error=error))
        await _watch(session, close, close.upstream)
    finally:
        try:
            await asyncio.shield(_finish(session, close, reason=reason, error=error))
        finally:
            session.off("close", on_close)


async def _wait_for_start(session: Any, close: _Close) -> None:
    """``start()`` holds the session lock (a toolset setup, ``on_enter``): wait until the
    drain deadline, then cancel what it waits on."""
    lock = session._lock
    if not lock.locked():
        return
    acquire = asyncio.ensure_future(lock.acquire())
    if await close.wait(acquire, close.drain_deadline):
        lock.release()
        return
    owned = {id(session)}
    starting = [t for t in asyncio.all_tasks() if t is not close.task and _tasks.works_for(t, owned)]
    close.cancel(
        [
            t
            for t in starting
            if any(f.f_code.co_name.startswith("_update_activity") for f in _tasks.frames(t))
        ]
    )
    for act in _tasks.activities(session, close):
        _tasks.force(close, act)
    if await close.wait_for(acquire, _grace()):
        lock.release()
    else:
        acquire.cancel()


async def _watch(session: Any, close: _Close, upstream: asyncio.Future[Any]) -> None:
    """Past the drain deadline, what the close waits on outside ``drain()`` (the forced
    interrupt, an ``AgentTask``'s end, the current speech) is cancelled too; past the close
    deadline, the close is abandoned and completed by :func:`_finish`."""
    if await close.wait(upstream, close.drain_deadline):
        return
    for act in _tasks.activities(session, close):
        _tasks.force(close, act)
    if not await close.wait_for(upstream, _grace()):
        for act in _tasks.activities(session, close):
            _tasks.quarantine(close, act)
    if not await close.wait(upstream, lambda: close.close_deadline(reserve=2 * _grace())):
        upstream.cancel()
        await asyncio.wait({upstream}, timeout=_grace())


async def _finish(session: Any, close: _Close, *, reason: Any, error: Any) -> None:
    """Complete the close: activities closed, the close event emitted once, the streams
    and tasks still working for the session stopped."""
    from livekit.agents.voice.events import CloseEvent

    try:
        if close.upstream is not None and not close.upstream.done():
            close.upstream.cancel()
            await asyncio.wait({close.upstream}, timeout=_grace())
        clean = close.upstream is not None and close.upstream.done() and not close.upstream.cancelled()
        clean = clean and not close.cancelled and not close.zombies
        for act in _tasks.activities(session, close):
            if not act._closed:
                close.escalate()
                await close_activity(act, act._aclose_unbounded)
            elif id(act) in close.closing:  # its aclose was cut midway
                await _complete_activity(close, act)
        if session._activity is not None and session._activity._closed:
            session._activity = None
        if close.was_started and not close.close_emitted:
            session._started = False
            session.emit("close", CloseEvent(error=error, reason=reason))
        if await _stop_leftovers(session, close) or not clean:
            await _tasks.sweep_streams(session, close, time.monotonic() + _grace())
    finally:
        session._closing_task = None
        if not session._started:
            session._cancel_user_away_timer()
        close.ended = True
        close.escalate()  # the graceful timer goes


async def _stop_leftovers(session: Any, close: _Close) -> bool:
    """Cancel what still works for the session (a graceful close first lets it finish
    within its bound); spared: the close itself, the known zombies and the close's waiters.
    True when anything was left."""
    leftover = _tasks.leftovers(session, close)
    if leftover and close.forced_at is None:  # a drain-blocked hook, say
        await asyncio.wait(leftover, timeout=max(0.0, close.t0 + GRACEFUL_TIMEOUT - time.monotonic()))
    await _tasks.settle(close, leftover, _grace())
    return bool(leftover)


def set_user_away_timer(session: Any, unbounded: Callable[[], None]) -> None:
    """``AgentSession._set_user_away_timer``: a closed session arms no timer (a speech that
    ends after a forced close would otherwise pin the session until it fires)."""
    if not session._started and _STATE in session.__dict__:
        session._cancel_user_away_timer()
        return
    unbounded()


async def end_call(tool: Any, unbounded: Unbounded, ctx: Any) -> Any:
    """``EndCallTool._end_call``: the tool shuts the session down once the goodbye played
    out, which a caller who hung up never reports; after ``GRACEFUL_TIMEOUT`` the session
    is closed by force."""
    from livekit.agents.voice.events import CloseReason

    result = await unbounded(ctx)
    session, handle = ctx.session, ctx.speech_handle

    def expire() -> None:
        if session._started and not handle.done():
            session._close_soon(reason=CloseReason.USER_INITIATED, drain=False)

    timer = asyncio.get_running_loop().call_later(GRACEFUL_TIMEOUT, expire)
    handle.add_done_callback(lambda _: timer.cancel())
    session.once("close", lambda _: timer.cancel())
    return result
