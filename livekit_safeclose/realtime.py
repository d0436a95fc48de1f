"""Realtime models at the end of a close: nobody is left waiting on a closed realtime session.

A realtime session (``llm.RealtimeSession``) answers its callers over its websocket:
``update_chat_ctx()`` of the OpenAI plugin waits up to 5 s for the server to confirm every
item it sent. Once the session is closed those answers never come (the client drops what
arrives after ``aclose()``, and sends nothing more).

The path that reaches it during a close: upstream's tool runner (``_execute_tools_task``)
absorbs a cancellation (it waits for its tools and returns normally), so the speech task
that awaited it is not cancelled by the close's force: it goes on, records the cancelled
tool's output and pushes it to the realtime session with ``update_chat_ctx()``. When that
happens after the close's last force, the task was already counted a zombie (it "swallowed"
the cancel), and it waits out the 5 s after the close returned.

:func:`finish` (a completion finisher) cancels every task still waiting in a method of the
session's realtime sessions, zombies included (what parked there can be cancelled: the
absorbed cancel was never theirs), gives them the unwind grace and names them in the
report's ``realtime.waits`` step. A realtime session's own connection is the stream
ledger's business (kind ``realtime``): the close's sweep stops it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from .bounded_close import BoundedClose
from .ownership import activities_of
from .stacks import frames, task_name

_RECORD_MARGIN = 0.05


def realtime_sessions_of(session: Any, close: BoundedClose) -> list[Any]:
    """The realtime sessions of the activities the close touched and the live ones."""
    acts = list(close.activities) + [a for a in activities_of(session) if a not in close.activities]
    out: list[Any] = []
    for act in acts:
        rt = getattr(act, "_rt_session", None)
        if rt is not None and rt not in out:
            out.append(rt)
    return out


def waits_on(task: asyncio.Task[Any], owners: set[int]) -> bool:
    """True when ``task`` is parked in a method of one of ``owners`` (by ``id``) on behalf
    of someone else: its outermost frame is not theirs (their own tasks, the websocket
    loop, are the connection, which the stream sweep stops)."""
    chain = list(frames(task, into_tasks=False))
    if not chain or id(chain[0].f_locals.get("self")) in owners:
        return False
    return any(id(f.f_locals.get("self")) in owners for f in chain[1:])


def _where(task: asyncio.Task[Any], owners: set[int]) -> str:
    for f in frames(task, into_tasks=False):
        if id(f.f_locals.get("self")) in owners:
            return f.f_code.co_name
    return "?"


def finish(session: Any, close: BoundedClose) -> Coroutine[Any, Any, None] | None:
    """Cancel what still waits on the session's realtime sessions (see the module doc);
    ``None`` for a session with none (the finisher protocol of ``completion``)."""
    owners = {id(rt) for rt in realtime_sessions_of(session, close)}
    return _stop_waiters(close, owners) if owners else None


async def _stop_waiters(close: BoundedClose, owners: set[int]) -> None:
    me = asyncio.current_task()
    waiting = [
        t
        for t in asyncio.all_tasks()
        if t is not me and not t.done() and t not in close.waiters and waits_on(t, owners)
    ]
    if not waiting:
        return
    start = time.monotonic()
    named = [f"{task_name(t)} in {_where(t, owners)}" for t in waiting]
    live = close.cancel(waiting)
    # a little inside the finisher's own bound (the same grace), so this step is recorded
    await asyncio.wait(live, timeout=max(0.0, close.left(close.grace()) - _RECORD_MARGIN))
    stuck = close.mark_zombies([t for t in live if not t.done()])
    detail = f"{len(live) - len(stuck)}/{len(live)} stopped: " + "; ".join(named)
    close.record("realtime.waits", start, "timeout" if stuck else "done", detail)
    close.forced = True
