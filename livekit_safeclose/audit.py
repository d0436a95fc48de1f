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
from .bounded_close import closing_of
from .ownership import objects_of
from .report import StuckTask, stuck_task
from .stacks import parked_at, swallowed_cancel, works_for


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
        for title, items in (
            ("tasks still running", self.tasks),
            ("zombies (swallowed cancellation)", self.zombies),
        ):
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


def audit(session: Any) -> Audit:
    """What ``session`` left behind; call it after the close returned, in its loop."""
    close = closing_of(session, live_only=False)
    streams = streams_mod.streams_of(session)
    owned = objects_of(
        session,
        list(close.activities) if close is not None else [],
        list(close.io_objects) if close is not None else [],
    )
    owned |= {id(e.stream) for e in streams}
    zombies = set(close.zombies) if close is not None else set()
    me = asyncio.current_task()
    result = Audit(streams=streams_mod.open_streams(session))
    for task in asyncio.all_tasks():
        if task is me or task.done() or not works_for(task, owned):
            continue
        if task in zombies or swallowed_cancel(task):
            result.zombies.append(stuck_task(task, swallowed_cancel=True))
        else:
            result.tasks.append(stuck_task(task))
    loop = asyncio.get_running_loop()
    for handle in list(getattr(loop, "_scheduled", [])):
        if handle.cancelled():
            continue
        cb = getattr(handle, "_callback", None)
        owner = getattr(cb, "__self__", None)
        if owner is not None and id(owner) in owned:
            result.timers.append(getattr(cb, "__qualname__", repr(cb)))
    return result
