"""The shape of a bounded close with none of its bookkeeping: what the floor costs at least.

A close that can always end by its bound needs, on Python 3.11, at least this much on every
close, healthy or not:

* one shared closing task, joined shielded, so a caller cancelled from outside (the job's
  ``wait_for`` guard) cannot cut the close short;
* the close's deadline timer;
* upstream's ``_aclose_impl``, ``AgentActivity.drain`` and ``AgentActivity.aclose`` each run
  in a task of their own, watched (a waiter future woken from inside the task, and the
  deadline): an await of a task that swallows cancellation (a zombie tool or ``on_exit``)
  cannot be cut short from inside the awaiting task, because ``Task.cancel()`` forwards to
  the awaited task and keeps waiting.

It keeps no report, no metrics, no stream ledger check and no audit, and it forces nothing:
the latency section closes the same healthy sessions with it, interleaved with vanilla and
the layer, so ``skeleton/vanilla`` is the floor ratio no complete layer of this design can
go under. Only this benchmark installs it (never with the layer installed).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from livekit.agents.voice.agent_activity import AgentActivity
from livekit.agents.voice.agent_session import AgentSession

#: what the skeleton wraps: (class, method name)
TARGETS: tuple[tuple[type, str], ...] = (
    (AgentSession, "_aclose_impl"),
    (AgentActivity, "drain"),
    (AgentActivity, "aclose"),
)
#: the layer's production bounds (drain 5 s, close 10 s): never reached by a healthy close
DEADLINE_S = 10.0

_saved: dict[tuple[type, str], Any] = {}


async def _watched(aw: Awaitable[Any], waiter: asyncio.Future[None]) -> Any:
    try:
        return await aw
    finally:
        _wake(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _watch(aw: Awaitable[Any]) -> Any:
    """Run ``aw`` in a task of its own; wait for it until the deadline, never cancelling it."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    inner = asyncio.ensure_future(_watched(aw, waiter))
    timer = loop.call_later(DEADLINE_S, _wake, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
    return inner.result()


def _watching(original: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await _watch(original(self, *args, **kwargs))

    return wrapper


def _shared_close(original: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def _aclose_impl(self: Any, **kwargs: Any) -> None:
        task: asyncio.Task[Any] | None = self.__dict__.get("_skeleton_close")
        if task is None or task.done():
            task = self.__dict__["_skeleton_close"] = asyncio.create_task(_watch(original(self, **kwargs)))
        await asyncio.shield(task)

    return _aclose_impl


def install() -> None:
    if _saved:
        return
    for cls, name in TARGETS:
        _saved[(cls, name)] = cls.__dict__[name]
    AgentSession._aclose_impl = _shared_close(_saved[(AgentSession, "_aclose_impl")])  # type: ignore[method-assign]
    AgentActivity.drain = _watching(_saved[(AgentActivity, "drain")])  # type: ignore[method-assign]
    AgentActivity.aclose = _watching(_saved[(AgentActivity, "aclose")])  # type: ignore[method-assign]


def uninstall() -> None:
    for (cls, name), original in _saved.items():
        setattr(cls, name, original)
    _saved.clear()
