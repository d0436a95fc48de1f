"""AgentActivity side of a bounded close: upstream's ``drain()`` and ``aclose()``, watched.

Upstream's ``drain()`` holds ``AgentActivity._lock`` while it waits for every speech task,
and ``aclose()`` needs that lock before it closes the models. One speech task that never
settles therefore keeps the STT/TTS/LLM streams open forever. Both wrappers below run the
upstream method unchanged, in a task watched by the close's deadlines; only when a bound
passes do they act, and then without the lock.

Cancellation rules enforced here:

* **force** (:func:`force`): at the drain bound, every unsettled speech, tool and
  scheduling task of the activity is cancelled lock-free; ``drain()`` then unwinds by
  itself and the wrapper turns that cancellation into a normal return;
* **quarantine** (:func:`quarantine`): a forced task still running one unwind grace later
  swallowed the cancellation (a zombie). It is taken out of upstream's bookkeeping (its tool
  entry dropped, its speech handle marked done, as upstream's own interruption timeout does)
  so no upstream wait is computed from it again;
* a ``drain()`` still stuck after that is abandoned with the lock held; the activity's
  ``aclose()`` then runs on a fresh lock, since the old one will never be released in time;
* a forced ``aclose()`` cancels every tool (cancellable or not, the toolsets' own calls
  included) before upstream's body runs, and stops the session's streams from outside when
  a model close waits on its provider.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import toolsets
from .adapters import close_recognition, end_speech, forget_tool_tasks, handoff_parts, tool_tasks
from .bounded_close import MODEL_CLOSE_ALLOWANCE, UNWIND_GRACE, BoundedClose, closing_of
from .ownership import note_handed_over, outputs_of, sinks_held_by
from .report import StepOutcome
from .stacks import frames

Method = Callable[..., Coroutine[Any, Any, Any]]

#: kept before the teardown bound for completing an abandoned activity close
COMPLETE_RESERVE = 0.3
#: how long after the final-transcript wait the models' close may take before a sweep
TRANSCRIPT_MARGIN = 0.1


def unsettled_tasks(activity: Any) -> list[asyncio.Task[Any]]:
    """Speech tasks (``on_enter``/``on_exit`` included) and tool tasks that have not ended:
    what ``drain()`` and ``aclose()`` wait on."""
    return [t for t in list(activity._speech_tasks) + tool_tasks(activity) if not t.done()]


def force(close: BoundedClose, activity: Any) -> None:
    """Cancel the activity's unsettled tasks and its scheduling task, taking no lock and
    awaiting nothing: ``drain()`` holds the lock while it waits on exactly these."""
    from livekit.agents.voice.agent import _get_activity_task_info

    tasks = unsettled_tasks(activity) + toolsets.tool_tasks(activity)  # a speech waits on these too
    close.io_objects.update(outputs_of(activity._session))  # the sinks as they are now
    close.note_speeches_of(activity._session)
    if (sched := activity._scheduling_atask) is not None and not sched.done():
        tasks.append(sched)
    close.cancel(tasks)
    for task in tasks:
        # a speech task waits on helper tasks of its handle (authorization, playout) that its
        # cancellation does not reach: they work for the session too
        info = _get_activity_task_info(task)
        if info is not None and info.speech_handle is not None:
            close.io_objects.add(info.speech_handle)
            close.io_objects.update(sinks_held_by(task))


def quarantine(close: BoundedClose, activity: Any) -> None:
    """Take the activity's zombies out of upstream's bookkeeping (see the module doc)."""
    if not close.cancelled_tasks and not close.zombies:
        return  # nothing was cancelled, so nothing can have swallowed it: every healthy close
    from livekit.agents.voice.agent import _get_activity_task_info

    stuck = [t for t in unsettled_tasks(activity) if t in close.cancelled_tasks]
    close.mark_zombies(stuck)
    forget_tool_tasks(activity, close.zombies)
    for task in stuck:
        info = _get_activity_task_info(task)
        end_speech(info.speech_handle if info is not None else None)


def spare_waiters(close: BoundedClose, activity: Any) -> None:
    """A tool awaiting the close resumes after it and must finish: upstream's ``aclose``
    cancels every tool it knows of, so the close's waiters are taken out of its
    bookkeeping first (their own end removes the entry anyway)."""
    forget_tool_tasks(activity, close.waiters)


def spare_own_tool(activity: Any) -> None:
    """An activity closed from inside one of its own tools would wait for that tool (a
    non-cancellable one: a self-await that never ends) or cancel it (ending the close
    midway): upstream's ``AgentTask``, awaited in a tool, closes the activity it paused when
    the agent changed meanwhile. The caller is taken out of the executor's registry first,
    as a drain's blocked tasks are: the close runs to its end, then the tool goes on. Its
    speech can only end after the tool, so for the close's wait on the interrupted
    background speeches it is interrupted and done, as upstream's interruption timeout
    marks it (releases without a tool registry wait there instead)."""
    me = asyncio.current_task()
    if me is None:
        return
    forget_tool_tasks(activity, {me})
    from livekit.agents.voice.agent import _get_activity_task_info

    info = _get_activity_task_info(me)
    handle = info.speech_handle if info is not None and info.function_call is not None else None
    if (
        handle is not None
        and handle.allow_interruptions
        and handle in getattr(activity, "_background_speeches", ())
    ):
        end_speech(handle)


def _outcome(fut: asyncio.Future[Any]) -> tuple[StepOutcome, str]:
    if fut.cancelled():
        return "cancelled", ""
    exc = fut.exception()
    return ("error", f"{type(exc).__name__}: {exc}") if exc is not None else ("done", "")


async def settle_drain_phase(close: BoundedClose, activities: list[Any], fut: asyncio.Future[Any]) -> bool:
    """The drain bound passed while ``fut`` waits on speech: force, let it unwind,
    quarantine what did not, let it unwind again. True when ``fut`` finished (or the close
    left its drain phase)."""
    for act in activities:
        force(close, act)
    if await close.wait_phase_change(fut, "drain", close.drain_grace()):
        return True
    for act in activities:
        quarantine(close, act)
    return await close.wait_phase_change(fut, "drain", close.drain_grace())


def wrap_drain(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``AgentActivity.drain``."""

    @functools.wraps(original)
    async def drain(self: Any, *args: Any, **kwargs: Any) -> Any:
        close = closing_of(self._session)
        if close is None:
            resources = await original(self, *args, **kwargs)
            note_handed_over(self._session, handoff_parts(resources))
            return resources
        close.touch(self)
        start = time.monotonic()
        inner = close.watch(original(self, *args, **kwargs))
        inner.add_done_callback(functools.partial(_drained, close, self._session))
        forced = False
        try:
            if not await close.wait_phase(inner, drain=True):
                forced = True
                force(close, self)
                if not await close.wait_until(inner, close.drain_grace()):
                    quarantine(close, self)
                    await close.wait_until(inner, close.drain_grace())
        except asyncio.CancelledError:
            inner.cancel()
            raise
        if forced and not self._scheduling_paused:
            # drain() awaits on_exit before it pauses scheduling: cancelled there, it never
            # paused it, and a last user turn the close's flush commits would then take the
            # running path (a reply the close cancels) instead of landing in the history
            self._scheduling_paused = True
        if not inner.done():
            # a zombie keeps drain() parked, and the lock with it
            close.held_by_abandoned_drain.add(id(self))
            close.abandon("activity.drain", inner, start)
            return None
        outcome, detail = _outcome(inner)
        close.record("activity.drain", start, "timeout" if forced else outcome, detail)
        if outcome == "error" and not forced:
            raise inner.exception()  # type: ignore[misc]
        return inner.result() if outcome == "done" else None

    return drain


def _drained(close: BoundedClose, session: Any, fut: asyncio.Future[Any]) -> None:
    """Upstream's drain ended: what it hands over is the session's, and the outputs are
    noted (upstream detaches them right after the drain: a sink set during the close, the
    caller hung up, is seen only now, and a playout wait on it works for the session)."""
    if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
        note_handed_over(session, handoff_parts(fut.result()))
    close.io_objects.update(outputs_of(session))


def wrap_detach_reusable_resources(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``AgentActivity._detach_reusable_resources``: what one activity
    hands to the next (a handoff's drain, entering an ``AgentTask``'s pause) is noted as the
    session's the moment it is detached, so a close that cuts the hand-over short still sees
    the STT pipeline and its stream (held by no activity then)."""

    @functools.wraps(original)
    async def _detach_reusable_resources(self: Any, *args: Any, **kwargs: Any) -> Any:
        resources = await original(self, *args, **kwargs)
        note_handed_over(self._session, handoff_parts(resources))
        return resources

    return _detach_reusable_resources


def wrap_aclose(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``AgentActivity.aclose``."""

    @functools.wraps(original)
    async def aclose(self: Any) -> None:
        if not self._closed:
            spare_own_tool(self)
        close = closing_of(self._session)
        if close is None or self._closed:
            await original(self)
            return
        teardown = asyncio.current_task() is close.upstream  # not a handoff's aclose
        if close.graceful and not teardown:
            await original(self)  # a handoff during a graceful close: untouched
            return
        close.touch(self)
        if teardown:
            close.enter_phase("models")
        try:
            if close.graceful:
                abandoned = await _graceful(close, self, original)
                if abandoned is not None:
                    close.escalate("close_timeout")
                    await close.sweep_streams(self._session, close.grace())
                    await _complete(close, self, abandoned)
            else:
                await _forced(close, self, original)
        finally:
            if teardown:
                close.enter_phase("steps")

    return aclose


async def _graceful(close: BoundedClose, activity: Any, original: Method) -> asyncio.Future[Any] | None:
    """Upstream's aclose with the whole close bound (it still awaits background tools and
    the final transcript). ``None`` when it finished, else the abandoned task."""
    spare_waiters(close, activity)
    start = time.monotonic()
    inner = close.watch(original(activity))
    if not await close.wait_until(inner, _sweep_at(close, start, math.inf)):
        close.escalate("close_timeout")
        await close.sweep_streams(activity._session, close.grace())
        if not await close.wait_until(inner, close.grace()):
            close.abandon("activity.aclose", inner, start)
            return inner
    close.record("activity.aclose", start, *_outcome(inner))
    return None


def _sweep_at(close: BoundedClose, start: float, allowance: float, reserve: float = 0.0) -> float:
    """When a model close still running is helped by stopping the session's streams from
    outside: after the final-transcript wait plus ``allowance``, and early enough before the
    phase's own bound (less ``reserve``) that the activity's teardown can still finish
    after the sweep."""
    bound = close.steps_deadline() - reserve
    heard = start + close.transcript_timeout  # the final-transcript wait ends here
    room = max(0.0, bound - heard)
    early = bound - min(UNWIND_GRACE, room / 2)
    if close.holds_transcript():
        # the transcript wait is never cut for the reserve: a sweep waits until it ended
        # (and upstream closed the models right after), inside the phase's bound
        early = max(early, min(heard + TRANSCRIPT_MARGIN, close.steps_deadline() - TRANSCRIPT_MARGIN))
    return min(early, heard + allowance)


async def _forced(close: BoundedClose, activity: Any, original: Method) -> None:
    """A forced close of ``activity``: every tool cancelled, then upstream's ``aclose``
    watched; the session's streams stopped from outside when a model close hangs, and what
    an abandoned ``aclose`` never reached completed."""
    # the toolsets' own executors too: an MCP toolset drains its calls before closing its
    # server. A share of what is left, not a whole grace: a zombie tool the drain forced
    # must not eat the time the activity's own close needs
    tools = tool_tasks(activity) + toolsets.tool_tasks(activity)
    if tools:
        await close.settle("tools.cancel", tools, deadline=close.drain_grace())
    quarantine(close, activity)
    if close.zombies:
        toolsets.forget(activity, close.zombies)
    if close.waiters:
        spare_waiters(close, activity)
    if close.abandoned_in == "drain" and activity._lock.locked():
        # upstream's close was abandoned in its drain, and that drain, parked on a zombie,
        # still holds the lock: the same as a drain this wrapper abandoned itself
        close.held_by_abandoned_drain.add(id(activity))
    if id(activity) in close.held_by_abandoned_drain:
        # the abandoned drain keeps the old lock; the close goes on without it
        activity._lock = asyncio.Lock()
        close.record("activity.lock", time.monotonic(), "timeout", "held by an abandoned drain: a fresh lock")
    start = time.monotonic()
    inner = close.watch(original(activity))
    first = _sweep_at(close, start, MODEL_CLOSE_ALLOWANCE, reserve=COMPLETE_RESERVE)
    if not await close.wait_until(inner, first):
        await close.sweep_streams(activity._session, close.grace())
        # what an abandoned aclose did not reach (the audio recognition: upstream closes it
        # only after the realtime session) still needs time before the phase's bound
        second = max(time.monotonic(), min(close.grace(), close.steps_deadline() - COMPLETE_RESERVE))
        if not await close.wait_until(inner, second):
            close.abandon("activity.aclose", inner, start)
            await _complete(close, activity, inner)
            return
    close.record("activity.aclose", start, *_outcome(inner))
    if inner.cancelled() or inner.exception() is not None:
        # a swept model's cancellation (a realtime session's aclose awaits its main task)
        # ended upstream's body early: what it skipped is completed as for an abandoned one
        await _complete(close, activity, inner)


async def _complete(close: BoundedClose, activity: Any, abandoned: asyncio.Future[Any]) -> None:
    """What an abandoned ``aclose`` did not reach: the audio recognition (the STT stream;
    upstream closes it only after the realtime session), the activity's own tasks, and the
    agent's link to the activity (a restart with the same agent needs it cleared)."""
    recognition = activity._audio_recognition
    if recognition is not None:
        if _inside(abandoned, recognition):
            # abandoning cancelled the recognition's own close midway (before it closed the
            # turn detector's stream): once that unwound, the close is run again for the rest
            await close.wait_until(abandoned, close.grace())
        await close.step("audio_recognition.aclose", close_recognition(recognition), deadline=close.grace())
    rest = unsettled_tasks(activity)
    if (sched := activity._scheduling_atask) is not None:
        rest.append(sched)
    await close.settle("activity.tasks", rest)
    if activity.agent._activity is activity:
        activity.agent._activity = None


def _inside(fut: asyncio.Future[Any], owner: Any) -> bool:
    """True when ``fut`` is parked in a method of ``owner``."""
    if not isinstance(fut, asyncio.Task):
        return False
    return any(f.f_locals.get("self") is owner for f in frames(fut, into_tasks=False))
