"""Is the event loop quiet after a close? Wake-ups counted, and attributed.

A session that never really closed keeps waking the loop (livekit/agents#5212: an MCP
client whose anyio cancel scope keeps re-delivering a cancellation, ``CancelScope.
_deliver_cancellation`` rescheduling itself every iteration, CPU hot after ``aclose()``
returned). :func:`wakeup_window` counts the loop's wake-ups (returns from ``select()``)
for a while, timed from a thread so the measurement itself does not wake the loop, and
records every callback the loop runs meanwhile by what it belongs to (the idea of
``benchmarks/benchlib/quiet.py``, on any selector event loop: the running loop's selector
is wrapped for the window only). A wake-up is *attributable* when a callback it ran
belongs to the watched session (a task working for one of its objects), to the MCP client
(a task or callback of the ``mcp``/``anyio`` code), or to a task the caller names.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..stacks import frames

#: modules whose code is the MCP client's (its tasks)
MCP_MODULES = ("mcp.", "livekit.agents.llm.mcp")
#: and whose loose callbacks are (anyio's cancel-scope delivery among them)
MCP_CALLBACK_MODULES = (*MCP_MODULES, "anyio.")


def is_mcp_task(task: asyncio.Task[Any]) -> bool:
    """A task of the MCP client (the ``_run_client`` task, the SDK's transport and session
    tasks, a server's shutdown): its own await chain runs ``mcp`` SDK code or livekit's MCP
    module."""
    return any(
        str(f.f_globals.get("__name__", "")).startswith(MCP_MODULES) for f in frames(task, into_tasks=False)
    )


def mcp_tasks() -> list[asyncio.Task[Any]]:
    """The MCP client tasks running in this loop now."""
    return [t for t in asyncio.all_tasks() if not t.done() and is_mcp_task(t)]


@dataclass
class Window:
    """What the loop did during one window."""

    seconds: float
    wakeups: int = 0
    attributable: int = 0
    callbacks: Counter[str] = field(default_factory=Counter)
    attributed: Counter[str] = field(default_factory=Counter)

    def top(self, n: int = 6) -> dict[str, int]:
        return dict(self.attributed.most_common(n))


def _owner(handle: asyncio.Handle) -> tuple[asyncio.Task[Any] | None, Any]:
    """The task a callback steps or wakes (a timer resolving a future: whoever waits on
    it), and the callback itself."""
    cb: Any = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return owner, cb
    args: Any = getattr(handle, "_args", None) or ()
    fut = args[0] if args and isinstance(args[0], asyncio.Future) else None
    for waiter, _ctx in getattr(fut, "_callbacks", None) or []:
        task = getattr(waiter, "__self__", None)
        if isinstance(task, asyncio.Task):
            return task, cb
    return None, cb


def _label(task: asyncio.Task[Any] | None, cb: Any) -> str:
    if task is not None:
        return "task " + str(getattr(task.get_coro(), "__qualname__", task.get_name()))
    return "callback " + str(getattr(cb, "__qualname__", type(cb).__name__))


class _Attribution:
    """Decides, once per task or callback, whether it counts against the session."""

    def __init__(self, owned: set[int], tasks: set[asyncio.Task[Any]]) -> None:
        self._owned, self._tasks = owned, tasks
        self._cache: dict[int, bool] = {}

    def __call__(self, task: asyncio.Task[Any] | None, cb: Any) -> bool:
        key = id(task) if task is not None else id(getattr(cb, "__func__", cb))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._decide(task, cb)
        return hit

    def _decide(self, task: asyncio.Task[Any] | None, cb: Any) -> bool:
        if task is not None:
            if task in self._tasks or is_mcp_task(task):
                return True
            return any(id(f.f_locals.get("self")) in self._owned for f in frames(task, into_tasks=False))
        if id(getattr(cb, "__self__", None)) in self._owned:
            return True
        return str(getattr(cb, "__module__", "") or "").startswith(MCP_CALLBACK_MODULES)


async def wakeup_window(
    seconds: float, *, owned: Iterable[int] = (), tasks: Iterable[asyncio.Task[Any]] = ()
) -> Window:
    """Count the running loop's wake-ups for ``seconds``; ``owned``: ids of the session's
    objects (:func:`livekit_safeclose.ownership.objects_of`), ``tasks``: tasks that count
    against it whatever they run."""
    loop = asyncio.get_running_loop()
    selector: Any = getattr(loop, "_selector", None)
    if selector is None:
        raise RuntimeError("wakeup_window needs a selector event loop")
    out = Window(seconds)
    attributable = _Attribution(set(owned), set(tasks))
    recording = threading.Event()
    state = {"flagged": False}
    inner_select: Callable[..., Any] = selector.select
    original_run = asyncio.Handle._run

    def select(timeout: float | None = None) -> Any:
        events = inner_select(timeout)
        if recording.is_set():
            out.wakeups += 1
            state["flagged"] = False
        return events

    def run(handle: asyncio.Handle) -> None:
        if recording.is_set():
            task, cb = _owner(handle)
            label = _label(task, cb)
            out.callbacks[label] += 1
            if attributable(task, cb):
                out.attributed[label] += 1
                if not state["flagged"]:
                    state["flagged"] = True
                    out.attributable += 1
        original_run(handle)

    done: asyncio.Future[None] = loop.create_future()

    def timer() -> None:
        time.sleep(0.05)  # let the awaiting task park first
        recording.set()
        time.sleep(seconds)
        recording.clear()
        loop.call_soon_threadsafe(done.set_result, None)

    selector.select = select
    asyncio.Handle._run = run  # type: ignore[method-assign,assignment]
    try:
        threading.Thread(target=timer, name="safeclose-wakeup-window", daemon=True).start()
        await done
    finally:
        asyncio.Handle._run = original_run  # type: ignore[method-assign]
        del selector.select
    return out
