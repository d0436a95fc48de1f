"""The per-release differences the close path reads, each small and named.

Every place where livekit-agents releases differ in an internal the layer touches goes
through one function here, so the close path itself reads the same on every release. Each
function is written for the current shape (1.8.9); a release with another shape gets its
alternative here, chosen by what the installed release has (never by its version string),
with the row that names it in :mod:`.compat_table`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine
from typing import Any

from .stacks import runs_code


def tool_tasks(activity: Any) -> list[asyncio.Task[Any]]:
    """The activity's running tool tasks (the tool executor's registry)."""
    return [rt.exe_task for rt in list(activity._tool_executor._running_tasks.values())]


def forget_tool_tasks(activity: Any, tasks: set[Any] | Any) -> None:
    """Take ``tasks`` out of the tool executor's registry, so upstream's ``aclose`` neither
    waits for nor cancels them (their own end removes the entry anyway)."""
    executor = activity._tool_executor
    for call_id, running in list(executor._running_tasks.items()):
        if running.exe_task in tasks:
            executor._running_tasks.pop(call_id, None)


def add_drain_blocked(activity: Any, tasks: list[asyncio.Task[Any]]) -> None:
    """Upstream's drain-blocked set: ``drain()`` does not wait for these tasks."""
    activity._add_drain_blocked_tasks(tasks)


def close_recognition(recognition: Any) -> Coroutine[Any, Any, None]:
    """The audio recognition's close (the STT stream with it)."""
    coro: Coroutine[Any, Any, None] = recognition._aclose()
    return coro


def start_tasks(session: Any) -> list[asyncio.Task[Any]]:
    """The tasks ``start()`` is waiting on: this session's first activity update (toolset
    setup, activity start)."""
    code = inspect.unwrap(type(session)._update_activity_task).__code__
    return [t for t in asyncio.all_tasks() if not t.done() and runs_code(t, code, session)]


def transcript_timeout(session: Any) -> float:
    """How long the close waits for the final user transcript."""
    opts = getattr(session, "_opts", None)
    return float(getattr(opts, "session_close_transcript_timeout", 2.0))
