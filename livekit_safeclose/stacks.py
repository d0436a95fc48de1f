"""The one await-chain walker: where a task is parked, and on whose behalf it runs.

``Task.get_stack()`` stops at the outermost coroutine frame, but the line that matters (a
tool's ``await``) is usually several awaits, and often another task, deeper. Every reader
of task internals in the layer (the close report, the post-close audit, the job's
leftovers, finding what ``start()`` waits on, attributing a stream to its session) walks
the chain through :func:`frames`, so the rules for following it live in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import CodeType, CoroutineType, FrameType, GeneratorType
from typing import Any

#: how deep one coroutine chain is followed, and how many awaited tasks are followed
_MAX_DEPTH = 64
_MAX_TASKS = 8
#: the code of the layer's pass-through wrappers (a watched upstream call's task body):
#: skipped, so the chain reads as if the upstream call ran as the task itself
_TRANSPARENT: set[CodeType] = set()


def transparent(fn: Any) -> None:
    """Make ``fn``'s frames invisible to :func:`frames`."""
    _TRANSPARENT.add(fn.__code__)


def hidden(code: CodeType) -> bool:
    """True for the code of a wrapper :func:`transparent` made invisible."""
    return code in _TRANSPARENT


def _coroutine_frames(obj: Any) -> Iterator[FrameType]:
    """Frames of one coroutine chain (coroutines, async generators, generator-based
    awaitables), outermost first."""
    for _ in range(_MAX_DEPTH):
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None and isinstance(obj, GeneratorType):
            frame = obj.gi_frame
        if frame is not None and frame.f_code not in _TRANSPARENT:
            yield frame
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
        if nxt is None and isinstance(obj, GeneratorType):
            nxt = obj.gi_yieldfrom
        if nxt is None or (
            not isinstance(nxt, (CoroutineType, GeneratorType)) and not hasattr(nxt, "ag_frame")
        ):
            return
        obj = nxt


def frames(task: asyncio.Task[Any], *, into_tasks: bool = True) -> Iterator[FrameType]:
    """Every frame ``task`` is parked in, outermost first; with ``into_tasks``, continue
    into the task it awaits (``await other_task``), and so on."""
    current: Any = task
    for _ in range(_MAX_TASKS):
        yield from _coroutine_frames(current.get_coro())
        if not into_tasks:
            return
        waiter = getattr(current, "_fut_waiter", None)
        if not isinstance(waiter, asyncio.Task) or waiter.done():
            return
        current = waiter


def awaited_tasks(task: asyncio.Task[Any]) -> Iterator[asyncio.Task[Any]]:
    """The tasks ``task`` is waiting on, nearest first (``await other_task``, and so on)."""
    current: Any = task
    for _ in range(_MAX_TASKS):
        waiter = getattr(current, "_fut_waiter", None)
        if not isinstance(waiter, asyncio.Task) or waiter.done():
            return
        yield waiter
        current = waiter


def _line(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def await_chain(task: asyncio.Task[Any], limit: int = 8) -> list[str]:
    """Where ``task`` is parked, outermost first, trimmed to the innermost ``limit`` lines
    (those say where it is stuck)."""
    return [_line(f) for f in frames(task)][-limit:]


def parked_at(stack: list[str]) -> str:
    """The innermost line outside asyncio itself: the line a reader should look at."""
    for line in reversed(stack):
        if "/asyncio/" not in line:
            return line
    return stack[-1] if stack else "?"


def runs_code(task: asyncio.Task[Any], code: CodeType, owner: Any) -> bool:
    """True when ``task``'s own chain is inside ``code`` with ``self`` being ``owner``."""
    for frame in frames(task, into_tasks=False):
        if frame.f_code is code and frame.f_locals.get("self") is owner:
            return True
    return False


#: the locals that say on whose behalf a frame runs: its ``self``, and the speech handle a
#: module-level function was given (1.5.x: ``_execute_tools_task(speech_handle=...)``, which
#: gathers the tool tasks and is no method of anything)
_OWNER_LOCALS = ("self", "speech_handle")


def works_for(task: asyncio.Task[Any], owned: set[int]) -> bool:
    """True when a frame of ``task``'s own chain is a method of one of the ``owned``
    objects (by ``id``), or was given one of them as its speech handle: the task runs on
    their behalf."""
    # ``f_locals`` builds a dict of every local: read only in frames that take an owner
    return any(
        id(f.f_locals.get(name)) in owned
        for f in frames(task, into_tasks=False)
        for name in _OWNER_LOCALS
        if name in f.f_code.co_varnames[: f.f_code.co_argcount + f.f_code.co_kwonlyargcount]
    )


def module_of(task: asyncio.Task[Any]) -> str:
    """The module of the task's outermost coroutine (``"?"`` when it has no frame)."""
    for frame in frames(task, into_tasks=False):
        return str(frame.f_globals.get("__name__", "?"))
    return "?"


def task_name(task: asyncio.Task[Any]) -> str:
    """The task's name, with its coroutine's qualified name when that says more."""
    qual = getattr(task.get_coro(), "__qualname__", "") or ""
    name = task.get_name()
    return f"{name} ({qual})" if qual and qual not in name else name


def swallowed_cancel(task: asyncio.Task[Any]) -> bool:
    """Cancelled at least once and still running (Python 3.11+; ``False`` before)."""
    cancelling = getattr(task, "cancelling", None)
    return not task.done() and cancelling is not None and cancelling() > 0
