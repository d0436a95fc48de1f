"""Post-close audit: what a closed session left behind.

Teams see CPU stay hot after calls end and cannot tell why. ``audit(session)`` names the
asyncio tasks still running on the session's behalf, the timers it still has pending and the
streams still open, and lists separately the zombies: tasks that were cancelled and
swallowed it, which nothing short of the process exiting will stop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from . import streams as streams_mod
from .report import StuckTask, parked_at, stuck_task


@dataclass
class Audit:
    """What is still alive for one session after its close returned."""

    tasks: list[StuckTask] = field(default_factory=list)
    zombies: list[StuckTask] = field(default_factory=list)
    timers: list[str] = field(default_factory=list)
    streams: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not (self.tasks or self.zombies or self.timers or self.streams.get("total", 0))

    def describe(self) -> str:
        if self.clean:
            return "nothing left behind"
        out: list[str] = []
        for title, items in (("tasks still running", self.tasks), ("zombies (swallowed cancellation)", self.zombies)):
            if items:
                out.append(f"{title}:")
                for t in items:
                    out.append(f"  - {t.name} parked at {parked_at(t.stack)}")
                    out.extend(f"      {line}" for line in t.stack)
        if self.timers:
            out.append("pending timers: " + ", ".join(self.timers))
        if self.streams.get("total", 0):
            out.append(f"open streams: {self.streams}")
        return "\n".join(out)


def _owned_objects(session: Any) -> set[int]:
    """Ids of the objects whose methods run on the session's behalf."""
    objs: list[Any] = [session]
    run = session.__dict__.get("_safeclose_run")
    acts = list(getattr(run, "activities", []) or [])
    if session._activity is not None:
        acts.append(session._activity)
    for act in acts:
        objs += [act, act.agent, act._audio_recognition, act._tool_executor, act._rt_session]
        recog = act._audio_recognition
        if recog is not None:
            objs.append(getattr(recog, "_stt_pipeline", None))
    objs += [e.stream for e in streams_mod.streams_of(session)]
    return {id(o) for o in objs if o is not None}


def _belongs(task: asyncio.Task[Any], owned: set[int]) -> bool:
    obj: Any = task.get_coro()
    for _ in range(32):
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None:
            return False
        if id(frame.f_locals.get("self")) in owned:
            return True
        obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
    return False


def audit(session: Any) -> Audit:
    """What ``session`` left behind; call it after the close returned, in its loop."""
    owned = _owned_objects(session)
    me = asyncio.current_task()
    result = Audit(streams=streams_mod.open_streams(session))
    for task in asyncio.all_tasks():
        if task is me or task.done() or not _belongs(task, owned):
            continue
        entry = stuck_task(task)
        cancelling = getattr(task, "cancelling", None)
        if cancelling is not None and cancelling() > 0:
            entry.swallowed_cancel = True
            result.zombies.append(entry)
        else:
            result.tasks.append(entry)
    loop = asyncio.get_running_loop()
    for handle in list(getattr(loop, "_scheduled", [])):
        if handle.cancelled():
            continue
        cb = getattr(handle, "_callback", None)
        owner = getattr(cb, "__self__", None)
        if owner is not None and id(owner) in owned:
            result.timers.append(getattr(cb, "__qualname__", repr(cb)))
    return result
