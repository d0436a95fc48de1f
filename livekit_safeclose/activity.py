"""AgentActivity side of a forced close: stop what is stuck without the activity lock.

Upstream's ``drain()`` holds ``AgentActivity._lock`` while it waits for every speech task,
and ``aclose()`` needs that lock before it closes the models. One speech task that never
settles therefore keeps the STT/TTS/LLM streams open forever. The two functions here are
the bodies an upstream fix would add: a lock-free force-cancel, and an ``aclose()`` whose
every wait is bounded when the session is force-closing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from livekit.agents import llm
from livekit.agents.voice.agent_activity import AgentActivity

from ._run import MODEL_CLOSE_ALLOWANCE, UNWIND_GRACE, CloseRun
from .report import stuck_task

#: upstream ``AgentActivity.aclose``, kept for handoffs and graceful closes
UPSTREAM_ACLOSE = AgentActivity.__dict__["aclose"]


def _forced_run(activity: AgentActivity) -> CloseRun | None:
    run: CloseRun | None = activity._session.__dict__.get("_safeclose_run")
    if run is None or run.graceful or (run.task is not None and run.task.done()):
        return None
    return run


def unsettled_tasks(
    activity: AgentActivity, spare: set[asyncio.Task[Any]] | None = None
) -> list[asyncio.Task[Any]]:
    """Speech tasks (``on_enter``/``on_exit`` included) and tool tasks still running."""
    spare = spare or set()
    tasks = [t for t in list(activity._speech_tasks) if not t.done()]
    tasks += [
        rt.exe_task for rt in list(activity._tool_executor._running_tasks.values()) if not rt.exe_task.done()
    ]
    if (t := activity._user_turn_completed_atask) is not None and not t.done():
        tasks.append(t)
    return [t for t in tasks if t not in spare]


def _force_cancel_speech_tasks(
    self: AgentActivity, *, spare: set[asyncio.Task[Any]] | None = None
) -> list[asyncio.Task[Any]]:
    """New ``AgentActivity._force_cancel_speech_tasks``: cancel the scheduling task and every
    speech and tool task that has not settled, *without taking the lock*.

    ``drain()`` holds the lock while it waits on exactly these tasks, so this is the only
    way to make it unwind. Returns the tasks it cancelled; it awaits nothing, because a task
    that swallows cancellation must not be able to hold the caller.
    """
    self._cancel_preemptive_generation()
    tasks = unsettled_tasks(self, spare)
    for task in tasks:
        task.cancel()
    sched = self._scheduling_atask
    if sched is not None and not sched.done():
        sched.cancel()
        tasks.append(sched)
    return tasks


async def _acquire(lock: asyncio.Lock, timeout: float) -> bool:
    """Take ``lock`` within ``timeout``; never leaves it taken on timeout."""
    if not lock.locked():
        await lock.acquire()
        return True
    acq = asyncio.ensure_future(lock.acquire())
    await asyncio.wait({acq}, timeout=timeout)
    if acq.done() and not acq.cancelled():
        return True
    acq.cancel()
    await asyncio.wait({acq})
    if acq.done() and not acq.cancelled() and acq.exception() is None:
        lock.release()
    return False


async def aclose(self: AgentActivity) -> None:
    """Replaces ``AgentActivity.aclose``.

    Handoffs and graceful closes run upstream's body unchanged. When the session is
    force-closing, the same steps run with every wait bounded by the close's deadline:
    tools are cancelled (not awaited) before the models are closed, and if an abandoned
    ``drain()`` still holds the lock the models are closed without it.
    """
    run = _forced_run(self)
    if run is None:
        await UPSTREAM_ACLOSE(self)
        return
    await aclose_forced(self, run)


async def _close_models(self: AgentActivity, run: CloseRun) -> None:
    """``_close_session()``, bounded. If the models do not close within the final
    transcript wait plus an allowance, a stream is waiting on its provider: stop the
    session's streams from outside and give the close a moment to finish by itself."""
    start = time.monotonic()
    task = asyncio.ensure_future(self._close_session())
    first = min(run.steps_deadline(), start + run.transcript_timeout + MODEL_CLOSE_ALLOWANCE)
    if not await run.wait(task, first):
        await run.sweep_streams(self._session, min(run.steps_deadline(), time.monotonic() + UNWIND_GRACE))
        if not await run.wait(task, min(run.steps_deadline(), time.monotonic() + UNWIND_GRACE)):
            run.report.stuck.append(stuck_task(task))
            run.report.abandoned.append("activity._close_session")
            run.pending.append(task)
            run.report.forced = True
            run.record("activity._close_session", (time.monotonic() - start) * 1000, "abandoned")
            return
    ms = (time.monotonic() - start) * 1000
    exc = None if task.cancelled() else task.exception()
    run.record("activity._close_session", ms, "error" if exc else "done", repr(exc) if exc else "")
    run.report.torn_down.append("activity._close_session")


async def aclose_forced(self: AgentActivity, run: CloseRun, *, again: bool = False) -> None:
    """The bounded ``aclose`` used by a forced close (see :func:`aclose`). ``again``:
    upstream's ``aclose()`` was abandoned half-way (it holds the lock): finish its job."""
    if self._closed and not again:
        return
    grace_deadline = min(run.steps_deadline(), time.monotonic() + UNWIND_GRACE)
    no_wait = run.lock_abandoned or again
    held = await _acquire(self._lock, 0.0 if no_wait else run.left(grace_deadline))
    if not held:
        run.report.forced = True
        run.record(
            "activity.lock", UNWIND_GRACE * 1000, "timeout", "held by an abandoned task; closing without it"
        )
    try:
        self._closed = True
        self._scheduling_resumed.set()
        self._cancel_preemptive_generation()
        await run.step("keyterm_detector.aclose", self._session._keyterm_detector.aclose())
        self._on_exit_task = None

        # a forced close cancels every tool, cancellable or not, before closing the models
        executor = self._tool_executor
        await run.cancel_and_settle("tools.cancel", [rt.exe_task for rt in list(executor._running_tasks.values())])

        if not held and not self._lock.locked():
            held = await _acquire(self._lock, 0)
        # closes the realtime session and the audio recognition (STT stream), after the
        # final user transcript was given its full session_close_transcript_timeout
        await _close_models(self, run)

        speeches = self._interrupt_background_speeches(force=True)
        await run.cancel_and_settle("background_speeches", [t for s in speeches for t in s._tasks])
        if self._scheduling_atask is not None:
            await run.cancel_and_settle("scheduling_task.cancel", [self._scheduling_atask])

        toolsets = list(self._mcp_tools) + [t for t in self._agent.tools if isinstance(t, llm.Toolset)]
        if toolsets:
            await run.step(
                "agent_toolsets.aclose",
                asyncio.gather(*(ts.aclose() for ts in toolsets), return_exceptions=True),
            )

        executor._pending_updates.clear()
        rest = [rt.exe_task for rt in executor._running_tasks.values()]
        if executor._reply_task is not None:
            rest.append(executor._reply_task)
        await run.cancel_and_settle("tool_executor.aclose", rest)
        self._agent._activity = None
    finally:
        if held:
            self._lock.release()
