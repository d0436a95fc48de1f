"""The per-release differences the close path reads, each small and named.

Every place where livekit-agents releases differ in an internal the layer touches goes
through one function here, so the close path itself reads the same on every release. Each
difference is a group of rows in :mod:`.compat_table` whose ``shape`` names its forms;
:func:`.compat.shape` says which form the installed release has, and the function here
follows it (never the version string):

* ``tool_registry``: ``executor`` (1.6.0+: ``_ToolExecutor._running_tasks``) or
  ``tagged_tasks`` (1.5.x: no registry; tools are ``func_exec_*`` tasks tagged with their
  speech handle, found through ``asyncio.all_tasks()``);
* ``drain_blocked``: ``set`` (1.6.1+: ``_add_drain_blocked_tasks``) or ``list`` (before:
  ``_pause_scheduling_task`` replaces the list, so :func:`wrap_pause_scheduling` puts the
  layer's entries back);
* ``recognition_close``: ``private`` (1.6.5+: ``AudioRecognition._aclose``) or ``public``
  (``aclose``);
* ``first_activity``: ``update_activity_task`` (1.7.0+: ``start()`` runs its first activity
  through ``_update_activity_task``) or ``update_activity`` (before: ``_update_activity``
  directly);
* the final-transcript wait: ``session_close_transcript_timeout``, or a fixed
  :data:`FIXED_TRANSCRIPT_WAIT` where the option does not exist (1.5.0-1.5.2).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from . import compat
from .stacks import runs_code

#: the final-transcript wait of the releases without ``session_close_transcript_timeout``
#: (a literal in their ``_aclose_impl``)
FIXED_TRANSCRIPT_WAIT = 2.0

#: where, on the ``list`` form, an activity keeps the tasks the layer exempted from its drain
_BLOCKED_ATTR = "_safeclose_drain_blocked"


def running_tools(activity: Any) -> list[tuple[str, asyncio.Task[Any]]]:
    """The activity's running tool calls: ``(tool name, task running its body)``."""
    if compat.shape("tool_registry") == "executor":
        running = list(activity._tool_executor._running_tasks.values())
        return [(rt.ctx.function_call.name, rt.exe_task) for rt in running if not rt.exe_task.done()]
    return _tagged_tools(activity)


def _tagged_tools(activity: Any) -> list[tuple[str, asyncio.Task[Any]]]:
    """``tagged_tasks``: the tool tasks tagged with a speech handle of one of the activity's
    speech tasks (a speech task awaits its tools, so it outlives them)."""
    from livekit.agents.voice.agent import _get_activity_task_info

    handles = set()
    for task in list(activity._speech_tasks):
        info = _get_activity_task_info(task)
        if info is not None and info.speech_handle is not None:
            handles.add(id(info.speech_handle))
    out: list[tuple[str, asyncio.Task[Any]]] = []
    for task in asyncio.all_tasks():
        info = _get_activity_task_info(task)
        call = info.function_call if info is not None else None
        if call is not None and not task.done() and id(info.speech_handle) in handles:  # type: ignore[union-attr]
            out.append((call.name, task))
    return out


def tool_tasks(activity: Any) -> list[asyncio.Task[Any]]:
    """The activity's running tool tasks."""
    return [task for _, task in running_tools(activity)]


def forget_tool_tasks(activity: Any, tasks: set[Any] | Any) -> None:
    """Take ``tasks`` out of the tool executor's registry, so upstream's ``aclose`` neither
    waits for nor cancels them (their own end removes the entry anyway). ``tagged_tasks``
    releases keep no registry: nothing to take out."""
    if not tasks or compat.shape("tool_registry") != "executor":
        return
    executor = activity._tool_executor
    for call_id, running in list(executor._running_tasks.items()):
        if running.exe_task in tasks:
            executor._running_tasks.pop(call_id, None)


def end_speech(handle: Any) -> None:
    """Interrupt ``handle`` and mark it done, as upstream's interruption timeout does, for a
    speech that can only end after the close (or never): the close's waits on it end, and a
    tool reply still made on it ends at once instead of waiting for an authorization that
    never comes (``interrupt()`` ignores a done handle, so the interruption comes first)."""
    if handle is not None and not handle.done():
        handle.interrupt(force=True)
        handle._mark_done()


def add_drain_blocked(activity: Any, tasks: list[asyncio.Task[Any]]) -> None:
    """Upstream's drain-blocked set: ``drain()`` does not wait for these tasks."""
    if compat.shape("drain_blocked") == "set":
        activity._add_drain_blocked_tasks(tasks)
        return
    # ``list``: the pause that starts the drain replaces the list (wrap_pause_scheduling
    # puts these back); a drain already paused reads the current one
    activity.__dict__.setdefault(_BLOCKED_ATTR, []).extend(tasks)
    if activity._scheduling_paused:
        activity._drain_blocked_tasks.extend(t for t in tasks if t not in activity._drain_blocked_tasks)
        activity._wake_up_scheduling_task()


def wrap_pause_scheduling(original: Callable[..., Any], _options: Any) -> Callable[..., Any]:
    """Patch-table factory for ``AgentActivity._pause_scheduling_task`` on the ``list`` form
    of ``drain_blocked``: the tasks the layer exempted join the blocked tasks the pause sets."""

    @functools.wraps(original)
    async def _pause_scheduling_task(self: Any, *, blocked_tasks: Any = None) -> Any:
        kept = [t for t in self.__dict__.get(_BLOCKED_ATTR, ()) if not t.done()]
        if kept:
            blocked_tasks = [*(blocked_tasks or []), *kept]
        return await original(self, blocked_tasks=blocked_tasks)

    return _pause_scheduling_task


def close_recognition(recognition: Any) -> Coroutine[Any, Any, None]:
    """The audio recognition's close (the STT stream with it)."""
    private = compat.shape("recognition_close") == "private"
    coro: Coroutine[Any, Any, None] = recognition._aclose() if private else recognition.aclose()
    return coro


def handoff_parts(resources: Any) -> list[Any]:
    """What ``AgentActivity.drain(new_activity=...)`` hands to the next activity (1.7.0+:
    a ``_ReusableResources``; before, ``None``): the parts that run tasks of their own."""
    names = ("stt_pipeline", "rt_session", "turn_detector_stream")
    return [p for n in names if (p := getattr(resources, n, None)) is not None]


def start_tasks(session: Any) -> list[asyncio.Task[Any]]:
    """The tasks ``start()`` is waiting on: this session's first activity update (toolset
    setup, activity start)."""
    name = (
        "_update_activity_task"
        if compat.shape("first_activity") == "update_activity_task"
        else "_update_activity"
    )
    code = inspect.unwrap(getattr(type(session), name)).__code__
    return [t for t in asyncio.all_tasks() if not t.done() and runs_code(t, code, session)]


def transcript_timeout(session: Any) -> float:
    """How long the close waits for the final user transcript."""
    opts = getattr(session, "_opts", None)
    return float(getattr(opts, "session_close_transcript_timeout", FIXED_TRANSCRIPT_WAIT))
