"""Bookkeeping every test run shares: the layer installed (or not) for one run with the
previous state restored after, and the tasks a run leaves behind."""

from __future__ import annotations

import asyncio
from typing import Any

import livekit_safeclose as lsc


class LayerForRun:
    """Install (``patched``) or uninstall the layer for one run; ``restore()`` puts back
    whatever was in force before, every option included.

    A run only changes the options it is given: the rest are the ones in force, or, when
    nothing is installed, ``worker=False``, because a test run closes sessions and must not
    take over the signal handling of the process it runs in."""

    def __init__(self, patched: bool, **options: Any) -> None:
        self.prev = lsc.installed_options()
        if patched:
            base = self.prev.as_dict() if self.prev is not None else {"worker": False}
            lsc.install(**{**base, **options})
        else:
            lsc.uninstall()

    def restore(self) -> None:
        if self.prev is not None:
            lsc.install(**self.prev.as_dict())
        else:
            lsc.uninstall()


def tasks_since(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks created since ``before`` that are still running (the caller excluded)."""
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t not in before and t is not me and not t.done()]


async def cancel_since(before: set[asyncio.Task[Any]], timeout: float = 0.5) -> list[asyncio.Task[Any]]:
    """Cancel what a run left behind and give it ``timeout`` to go (bounded: zombies stay).
    Returns the leftovers that could not be cancelled: tasks awaiting each other in a cycle,
    where ``Task.cancel()`` forwards around the cycle until ``RecursionError`` (Python
    3.11 does not stop at a task already being cancelled). They are left running, and the
    caller decides whether that is a finding; the cleanup itself never raises for them."""
    leftovers = tasks_since(before)
    cyclic: list[asyncio.Task[Any]] = []
    for t in leftovers:
        try:
            t.cancel()
        except RecursionError:
            cyclic.append(t)
    if leftovers:
        await asyncio.wait(leftovers, timeout=timeout)
    return cyclic


async def close_ended(session: Any) -> None:
    """Wait until the session's last close ended (its report is published then, a moment
    after the close event)."""
    from ..bounded_close import closing_of

    close = closing_of(session, live_only=False)
    if close is not None and close.task is not None:
        await asyncio.wait({close.task})
