"""The end of every bounded close: what upstream's close did not reach, finished.

Runs in the ``finally`` of the shared closing task, shielded, so it also runs when the close
is cancelled from outside (the job's ``wait_for`` guard). Each step is idempotent, a no-op
when upstream's close already did it, and bounded by what is left of the close bound:

1. upstream's close abandoned before its close event: the event is emitted here, once;
2. an activity the close touched that is still open is closed (forced);
3. any task still working on the session's behalf (a forwarding task an abandoned teardown
   never cancelled, a hook upstream does not await) is cancelled: what the audit would find;
4. what a feature module opened on the session's behalf and upstream does not close (each
   :data:`FINISHERS` entry), and with ``close_models`` the session's own model instances;
5. the session's provider streams still open are stopped, abandoned steps are settled;
6. the report is published.

A close with none of that to do (upstream's close ran to its end, nothing was forced, nothing
is open) ends in place instead (:func:`finish_now`): no task, no wait, nothing a cancellation
could cut short, and its report is built only when someone reads it.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import report as report_mod
from . import streams as streams_mod
from .activity import unsettled_tasks
from .bounded_close import UNWIND_GRACE, BoundedClose
from .ownership import activities_of, objects_of, running_sessions
from .stacks import awaited_tasks, works_for

#: ``"module:function"`` entries, each ``def finish(session, close) -> Awaitable | None``: one
#: per feature whose resources upstream does not tie to the session (run in order, each
#: bounded). ``None`` says "nothing of mine here", decided without touching the loop: a
#: healthy close pays no timeout, no record and no loop round trip for a feature it never used
FINISHERS: tuple[str, ...] = (
    "livekit_safeclose.realtime:finish",
    "livekit_safeclose.fallback:finish",
    "livekit_safeclose.toolsets:finish",
    "livekit_safeclose.background_audio:finish",
)


Finisher = Callable[[Any, BoundedClose], Awaitable[None] | None]

_resolved: list[tuple[str, Finisher]] = []


def _finishers() -> list[tuple[str, Finisher]]:
    """``(step name, function)`` of each :data:`FINISHERS` entry, resolved once."""
    if len(_resolved) != len(FINISHERS):
        from .patching import resolve

        _resolved[:] = [(d.split(":", 1)[0].rsplit(".", 1)[-1] + ".finish", resolve(d)) for d in FINISHERS]
    return _resolved


async def _run_finishers(session: Any, close: BoundedClose) -> bool:
    """Each finisher with work awaited in place under a timeout at the grace; one that hits
    the bound is cancelled there. True when one had work."""
    timeout: Any = getattr(asyncio, "timeout", None)  # Python 3.11+
    worked = False
    for name, fn in _finishers():
        work = fn(session, close)
        if work is None:
            continue
        worked = True
        if timeout is None:
            await close.step(name, work, deadline=close.grace())
            continue
        start = time.monotonic()
        try:
            async with timeout(close.left(close.grace())):
                await work
        except TimeoutError:
            close.record(name, start, "timeout")
        except Exception as exc:
            close.record(name, start, "error", f"{type(exc).__name__}: {exc}")
        else:
            close.record(name, start, "done")
    return worked


async def finish(
    session: Any, close: BoundedClose, *, reason: Any, error: Any, on_close: Callable[[Any], None]
) -> None:
    upstream = close.upstream
    completed = upstream is not None and upstream.done() and not upstream.cancelled()
    try:
        await _close_activities(session, close)
        if close.was_started and not close.close_emitted:
            _emit_close(session, close, reason=reason, error=error)
        # a stream is matched to its session through its creator's await chain: before the
        # leftovers (the creators among them) are cancelled, or the sweep cannot find it
        entries = streams_mod.streams_of(session)
        acted = await _let_skipped_work_finish(close, completed)
        if acted:
            await _stop_leftover_tasks(session, close)
        acted = await _run_finishers(session, close) or acted
        if close.options.close_models:
            acted = await _close_owned_models(session, close) or acted
        end = (
            close.close_deadline if not math.isinf(close.close_deadline) else time.monotonic() + UNWIND_GRACE
        )
        # the matching above is reused when nothing ran since that could open a stream
        if acted:
            entries = streams_mod.streams_of(session)
        swept = await close.sweep_streams(session, end, entries)
        if close.pending:
            await close.settle_pending(end)
            swept = True
        close.note_streams_left_open(session, None if swept else entries)
    finally:
        _end(session, close, completed, on_close)


def finish_now(session: Any, close: BoundedClose, on_close: Callable[[Any], None]) -> bool:
    """The end of a close that has nothing left to do, run in place (no task, no wait): what
    :func:`finish` would do when upstream's close ran to its end by itself, forced nothing
    and left nothing open. False, having changed nothing, when anything is left to do."""
    upstream = close.upstream
    if upstream is None or not upstream.done() or upstream.cancelled():
        return False
    if (close.was_started and not close.close_emitted) or close.options.close_models or not _clean(close):
        return False
    if session._activity is not None and not session._activity._closed:
        return False
    if any(not act._closed for act in close.activities) or any(not a._closed for a in activities_of(session)):
        return False
    if any(not e.task.done() for e in streams_mod.streams_of(session)):
        return False
    for _, fn in _finishers():
        work = fn(session, close)
        if work is not None:
            close_coro = getattr(work, "close", None)
            if close_coro is not None:
                close_coro()  # finish() makes it again
            return False
    session._activity = None
    _end(session, close, True, on_close)
    return True


def _end(session: Any, close: BoundedClose, completed: bool, on_close: Callable[[Any], None]) -> None:
    """The last of every close: the session can be closed again, the report is published."""
    # upstream never resets its closing task: a restarted session could not be shut
    # down again
    session._closing_task = None
    if not session._started:
        disarm_closed(session, close)
    close.forget_speeches_of(session)
    close.end()
    session.off("close", on_close)
    if close.was_forced():
        report_mod.emit(session, close.report(completed=completed), close.zombies)
    else:
        build = functools.partial(close.report, completed=completed)
        report_mod.publish_clean(session, build, close.reason, close.duration())


def disarm_closed(session: Any, close: BoundedClose) -> None:
    """Cancel the timers upstream re-arms on a session as its close ends, and again when
    each task the close cancelled has ended."""
    # a forced teardown's last agent-state change can re-arm upstream's user-away timer on
    # the closed session (it would fire, and pin the session, later)
    session._cancel_user_away_timer()
    if close.forced or close.cancelled_tasks:
        # a close that cut or cancelled something can leave a recognition's backchannel
        # timer armed; a clean one ran every recognition close to its end
        acts = list(close.activities)
        disarm_recognitions(acts)
        # so can the end of a task the close cancelled: one that ends only now, or one
        # already done whose upstream done callbacks (the agent state set listening, a
        # tool's end) are still queued (fuzz #6959)
        disarm_when_done(session, list(close.cancelled_tasks), acts)


def disarm_when_done(session: Any, tasks: list[asyncio.Task[Any]], activities: Sequence[Any] = ()) -> None:
    """When each of ``tasks`` ends on the closed session, cancel the timers its end re-armed
    (the user-away timer; the backchannel timer of ``activities``' recognitions). The
    callback holds the session and the activities weakly (a manager task may close many)."""
    ref = weakref.ref(session)
    act_refs = [weakref.ref(a) for a in activities]

    def _disarm(_: asyncio.Task[Any] | None = None) -> None:
        s = ref()
        if s is not None and not s._started:
            s._cancel_user_away_timer()
            disarm_recognitions([a for r in act_refs if (a := r()) is not None])

    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.add_done_callback(_disarm)
    if len(pending) < len(tasks):
        # the done ones' upstream done callbacks may still be queued (fuzz #6959): one call
        # scheduled now runs after all of them
        asyncio.get_running_loop().call_soon(_disarm)


def disarm_recognitions(activities: Sequence[Any]) -> None:
    """Cancel the backchannel-boundary timer of each closed activity's audio recognition.
    Upstream arms it (1 s by default) when playout starts and cancels it only at the very
    end of the recognition's close, which a cut close never reaches; a speech the close
    cancelled can also start playout after it. Left, it fires into the closed activity and
    pins it until then. Releases without the timer have nothing to cancel."""
    for act in activities:
        cancel = getattr(getattr(act, "_audio_recognition", None), "_cancel_backchannel_boundary", None)
        if cancel is not None and act._closed:
            cancel()


async def _close_activities(session: Any, close: BoundedClose) -> None:
    """Every activity the close touched is closed, even when upstream's close was
    abandoned before it got to one; the session then holds no activity."""
    acts = list(close.activities) + [a for a in activities_of(session) if a not in close.activities]
    for act in acts:
        if not act._closed:
            close.escalate("abandoned close")
            await act.aclose()
    if session._activity is not None and session._activity._closed:
        session._activity = None


def _emit_close(session: Any, close: BoundedClose, *, reason: Any, error: Any) -> None:
    """Upstream's close was abandoned before it emitted the close event that user code
    hangs ``ctx.shutdown()`` and webhooks on: emit it here, exactly once."""
    from livekit.agents.voice.events import CloseEvent

    session._started = False
    close.record("close_event", time.monotonic(), "done", "emitted by the layer")
    session.emit("close", CloseEvent(error=error, reason=reason))


def _clean(close: BoundedClose) -> bool:
    """Nothing forced so far: upstream's close ran to its end by itself, so it stopped what
    it started; the scan of every task in the process (most of what a healthy close costs
    the layer) is skipped. Not when a closed activity still runs a speech or tool task:
    upstream's drain skips the ones it is told not to wait for (an ``on_enter`` that an
    ``AgentTask`` interrupted), and its ``aclose`` does not cancel them."""
    if close.forced or close.pending or close.zombies or close.escalated_ms is not None:
        return False
    return not any(unsettled_tasks(act) for act in list(close.activities))


def _spared(close: BoundedClose, t: asyncio.Task[Any]) -> bool:
    """The close's own tasks, known zombies, and the close's waiters with whatever awaits
    them (a tool awaiting the close resumes after it)."""
    if t in (close.task, close.upstream, asyncio.current_task()) or t in close.zombies or t in close.waiters:
        return True
    return any(w in close.waiters for w in awaited_tasks(t))


def _drain_blocked_hooks(close: BoundedClose) -> list[asyncio.Task[Any]]:
    """The hooks of the close's activities still running (speech tasks without a speech
    handle: a reply may wait on a tool awaiting the close)."""
    from livekit.agents.voice.agent import _get_activity_task_info

    hooks = [t for act in list(close.activities) for t in list(act._speech_tasks) if not t.done()]
    return [
        t
        for t in hooks
        if t not in close.waiters
        and t not in close.zombies
        and getattr(_get_activity_task_info(t), "speech_handle", None) is None
    ]


async def _let_skipped_work_finish(close: BoundedClose, completed: bool) -> bool:
    """Upstream's drain skips what it is told not to wait for (the drain-blocked hooks: an
    ``on_enter`` an ``AgentTask`` interrupted) and its ``aclose`` does not cancel it, so it
    would outlive the close. A graceful close lets it, and any speech or tool of a closed
    activity, finish as it lets any speech: one wait, until the graceful bound and never
    past the teardown bound (cut there, the close is escalated). True when the leftover
    scan must run: something was forced, or a hook still runs."""
    if completed and _clean(close):
        return False
    hooks = _drain_blocked_hooks(close)
    rest = [t for act in list(close.activities) for t in unsettled_tasks(act) if not _spared(close, t)]
    waiting = hooks + [t for t in rest if t not in hooks]
    if close.graceful and waiting:
        start = time.monotonic()
        gathered = asyncio.gather(*waiting, return_exceptions=True)
        graceful = asyncio.ensure_future(close.wait_phase(gathered, drain=True))  # until escalated
        try:
            if not await close.wait_until(graceful, close.steps_deadline()):
                close.escalate("close_timeout")  # cut at the teardown bound: a forced close now
        finally:
            graceful.cancel()
        if hooks:
            close.record("drain_blocked.finish", start, "done" if all(t.done() for t in hooks) else "timeout")
    return any(not t.done() for t in hooks) or not (completed and _clean(close))


async def _stop_leftover_tasks(session: Any, close: BoundedClose) -> None:
    """Cancel what still works for the session: nothing opened on the session's behalf may
    outlive its close (but what :func:`_spared` spares)."""
    owned = objects_of(session, list(close.activities), list(close.io_objects))
    leftover = [
        t for t in asyncio.all_tasks() if not t.done() and not _spared(close, t) and works_for(t, owned)
    ]
    await close.settle("leftover_tasks.cancel", leftover)


def _models_of(holder: Any) -> list[Any]:
    return [m for m in (holder.stt, holder.llm, holder.tts) if m is not None and not isinstance(m, str)]


async def _close_owned_models(session: Any, close: BoundedClose) -> bool:
    """``close_models=True``: close the model instances this session used (the pooled
    inference TTS websockets live until ``tts.aclose()``), except any that another running
    session also uses. Bounded like every other step."""
    mine = {id(m): m for holder in [session, *close.activities] for m in _models_of(holder)}
    for other in running_sessions():
        if other is not session:
            for m in _models_of(other):
                mine.pop(id(m), None)
    if not mine:
        return False
    await close.step(
        "models.aclose",
        asyncio.gather(*(m.aclose() for m in mine.values()), return_exceptions=True),
        deadline=min(close.inner_deadline(), time.monotonic() + UNWIND_GRACE * 2),
    )
    return True
