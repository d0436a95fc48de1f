"""What works for a closing session: its activities, outputs and model streams, the tasks
that run on its behalf, and how the close cancels them (``_bounded_close`` is the close).

Nothing here awaits without a bound given by the caller, and nothing takes the activity
lock: the drain holds it while it waits on exactly these tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any


def activities(session: Any, close: Any) -> list[Any]:
    """The activities the close saw, the current one and the parents an ``AgentTask``
    returns to, and a next activity a handoff is starting (all noted by the close)."""
    from livekit.agents.voice.agent import AgentTask

    out = list(close.activities)
    act = session._activity
    while act is not None and act not in out:
        out.append(act)
        old = act.agent._old_agent if isinstance(act.agent, AgentTask) else None
        act = old._activity if old is not None else None
    nxt = getattr(session, "_next_activity", None)
    if nxt is not None and nxt not in out:
        out.append(nxt)
    for act in out:
        close.note(act)  # one a cancelled handoff forgets is still closed at the end
    return out


def outputs(session: Any) -> list[Any]:
    out: list[Any] = []
    for sink in (session.output.audio, session.output.transcription):
        while sink is not None and sink not in out:
            out.append(sink)
            sink = getattr(sink, "next_in_chain", None)
    return out


def frames(task: asyncio.Task[Any]) -> Iterator[FrameType]:
    """The frames of the task's await chain (not into the tasks it awaits)."""
    coro: Any = task.get_coro()
    while coro is not None:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is None:
            return
        yield frame
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )


def works_for(task: asyncio.Task[Any], owned: set[int]) -> bool:
    return any(id(f.f_locals.get("self")) in owned for f in frames(task))


def tool_tasks(activity: Any) -> list[asyncio.Task[Any]]:
    return [
        rt.exe_task for rt in list(activity._tool_executor._running_tasks.values()) if not rt.exe_task.done()
    ]


def forget_tools(activity: Any, tasks: set[asyncio.Task[Any]]) -> None:
    """Take ``tasks`` out of the tool executor: its ``aclose`` neither waits for nor cancels them."""
    running = activity._tool_executor._running_tasks
    for call_id, rt in list(running.items()):
        if rt.exe_task in tasks:
            running.pop(call_id, None)


def spare_own_tool(activity: Any) -> None:
    """An activity closed from inside one of its own tools (an ``AgentTask`` ending after a
    handoff closes the activity it paused): its tool drain must not wait for that tool."""
    me = asyncio.current_task()
    if me is not None:
        forget_tools(activity, {me})


def unsettled(activity: Any) -> list[asyncio.Task[Any]]:
    return [t for t in list(activity._speech_tasks) + tool_tasks(activity) if not t.done()]


def force(close: Any, activity: Any) -> None:
    """Cancel the activity's speech, tool and scheduling tasks, taking no lock and awaiting
    nothing: ``drain()`` holds the lock while it waits on exactly these."""
    from livekit.agents.voice.agent import _get_activity_task_info

    tasks = unsettled(activity)
    if (sched := activity._scheduling_atask) is not None:
        tasks.append(sched)
    close.owned += outputs(activity._session)
    for task in tasks:
        info = _get_activity_task_info(task)
        if info is not None and info.speech_handle is not None:
            close.owned.append(info.speech_handle)  # its playout helpers work for the session
            close.owned += sinks_of(task)
    close.cancel(tasks)


def sinks_of(task: asyncio.Task[Any]) -> list[Any]:
    """The audio outputs a speech task plays into: one the caller's hang-up replaced is no
    output of the session any more, yet a playout wait on it was started by this speech."""
    from livekit.agents.voice import io

    return [v for f in frames(task) for v in list(f.f_locals.values()) if isinstance(v, io.AudioOutput)]


def quarantine(close: Any, activity: Any) -> None:
    """A forced task still running swallowed its cancellation: no wait of the close is
    computed from it again (its tool entry dropped, its speech marked done)."""
    from livekit.agents.voice.agent import _get_activity_task_info

    stuck = [t for t in unsettled(activity) if t in close.cancelled]
    close.zombies.update(stuck)
    forget_tools(activity, close.zombies)
    for task in stuck:
        info = _get_activity_task_info(task)
        if info is not None and info.speech_handle is not None and not info.speech_handle.done():
            # interrupted first, as the interruption timeout finds a handle: a tool reply the
            # zombie's speech still creates on it ends at once, not waiting for authorization
            info.speech_handle.interrupt(force=True)
            info.speech_handle._mark_done()


async def settle(close: Any, tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel ``tasks`` and give them ``timeout`` to unwind; what did not is a zombie."""
    close.cancel(tasks)
    pending = [t for t in tasks if not t.done() and t not in close.waiters]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
        close.zombies.update(t for t in pending if not t.done())


def model_ids(session: Any, close: Any) -> set[int]:
    holders = [session, *activities(session, close)]
    return {id(m) for h in holders for m in (h.stt, h.tts, h.llm) if m is not None}


def stream_tasks(session: Any, close: Any) -> list[asyncio.Task[Any]]:
    """The main tasks of the open provider streams of the session's models."""
    from livekit.agents import llm, stt, tts

    kinds = (stt.RecognizeStream, tts.SynthesizeStream, tts.ChunkedStream, llm.LLMStream)
    models = model_ids(session, close)
    out = []
    for task in asyncio.all_tasks():
        frame = next(frames(task), None)
        owner = frame.f_locals.get("self") if frame is not None else None
        if task.done() or not isinstance(owner, kinds):
            continue
        model = getattr(owner, "_stt", None) or getattr(owner, "_tts", None) or getattr(owner, "_llm", None)
        if id(model) in models:
            out.append(task)
    return out


async def sweep_streams(session: Any, close: Any, deadline: float) -> None:
    """Stop the streams still open: a stream whose close waits for a provider goodbye ends
    on a second cancellation."""
    tasks = stream_tasks(session, close)
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    await asyncio.sleep(0)  # the first cancellation may only have started the goodbye wait
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))


def leftovers(session: Any, close: Any) -> list[asyncio.Task[Any]]:
    """The tasks still working for the session; spared: the close itself, the known zombies
    and the close's waiters."""
    objs: list[Any] = [session, *close.owned, *outputs(session)]
    for act in activities(session, close):
        recognition = act._audio_recognition
        objs += [act, act.agent, recognition, act._tool_executor, act._rt_session]
        objs.append(getattr(recognition, "_stt_pipeline", None))
    owned = {id(o) for o in objs if o is not None}
    mine = {close.task, close.upstream, asyncio.current_task()} | close.zombies | close.waiters
    return [t for t in asyncio.all_tasks() if t not in mine and not t.done() and works_for(t, owned)]


def exempt(session: Any, close: Any, me: asyncio.Task[Any] | None) -> None:
    """A tool (or speech) awaiting its own session's close must not be waited for by the
    close: that is an await cycle. Its speech is marked done, as the interruption
    timeout would."""
    from livekit.agents.voice.agent import _get_activity_task_info
    from livekit.agents.voice.agent_activity import _AgentActivityContextVar

    if me is None or me is close.task:
        return
    close.waiters.add(me)
    activity = _AgentActivityContextVar.get(None)
    if activity is None or activity._session is not session or activity._closed:
        return
    activity._add_drain_blocked_tasks([me])
    info = _get_activity_task_info(me)
    handle = info.speech_handle if info is not None else None
    if handle is not None and not handle.done():
        handle.interrupt(force=True)
        handle._mark_done()
