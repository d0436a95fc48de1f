"""An upstream call run in a task of its own, watched by a close.

Why a task of its own: an await of a task that swallows cancellation (a zombie tool or
``on_exit``) cannot be cut short from inside the awaiting task, because ``Task.cancel()``
forwards to the awaited task and keeps waiting. In its own task, the call can be abandoned
at the close's bound while the close goes on.

Rules enforced here:

* the waits on the call are woken from inside its task as it returns (the ``finally`` of
  :func:`_watched`): one loop turn to the waiter instead of the two a done callback takes.
  The task's one done callback (:func:`_ended`) wakes what is left: the waits of a task
  that ended without running its body (cancelled before it first ran). So the waits add no
  done callback of their own;
* the wrapper is invisible to every stack reader (:func:`.stacks.transparent`) and the task
  carries the upstream call's name, so reports read as if the call ran as the task itself;
* a task cancelled before it first ran never started the call: the call's coroutine is
  closed, so it is not reported as never awaited.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import stacks

T = TypeVar("T")


def start(aw: Awaitable[T], wakes: list[Callable[[], None]]) -> asyncio.Task[T]:
    """Run ``aw`` in a new task that calls each of ``wakes`` (as it is when the task ends)
    from inside itself as ``aw`` returns or raises."""
    coro = _watched(aw, wakes)
    setattr(coro, "__qualname__", getattr(aw, "__qualname__", "watched"))  # noqa: B010
    task = asyncio.ensure_future(coro)
    task.add_done_callback(functools.partial(_ended, aw, wakes))
    return task


async def _watched(aw: Awaitable[T], wakes: list[Callable[[], None]]) -> T:
    try:
        return await aw
    finally:
        for wake in wakes:
            wake()
        wakes.clear()  # woken: the done callback has none left to wake


stacks.transparent(_watched)


def _ended(aw: Awaitable[Any], wakes: list[Callable[[], None]], _: asyncio.Future[Any]) -> None:
    """The task ended: a call it never started is closed, and every wait on it is woken."""
    if getattr(aw, "cr_frame", None) is not None and inspect.iscoroutine(aw):
        if inspect.getcoroutinestate(aw) == inspect.CORO_CREATED:
            aw.close()
    for wake in list(wakes):
        wake()
