"""Taking an ``asyncio.Lock`` within a bound, without ever leaving it taken by mistake.

The close must wait for locks that a stuck task may hold forever (the session lock held by
``start()``, the activity lock held by a ``drain()`` parked on a tool). ``asyncio.wait_for``
around ``lock.acquire()`` has a race: the acquire can succeed in the same loop turn the
timeout fires, leaving the lock held by nobody who will release it. This helper closes that
race by checking, after cancelling the acquire, whether it had in fact succeeded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: waits for a future within some bound; True when it finished in time
Waiter = Callable[["asyncio.Future[Any]"], Awaitable[bool]]


def until(deadline: float) -> Waiter:
    """A :data:`Waiter` bounded by ``deadline`` (``time.monotonic()``)."""

    async def wait(fut: asyncio.Future[Any]) -> bool:
        await asyncio.wait({fut}, timeout=max(0.0, deadline - time.monotonic()))
        return fut.done()

    return wait


async def acquire_within(lock: asyncio.Lock, wait: Waiter) -> bool:
    """Acquire ``lock`` within the bound of ``wait``. True when held (the caller releases
    it); False when the bound passed, and then the lock is not held by this call."""
    if not lock.locked():
        await lock.acquire()
        return True
    acquire = asyncio.ensure_future(lock.acquire())
    if await wait(acquire) and not acquire.cancelled() and acquire.exception() is None:
        return True
    acquire.cancel()
    await asyncio.wait({acquire})
    # it may have won the race against the cancel
    return not acquire.cancelled() and acquire.exception() is None


async def free_within(lock: asyncio.Lock, wait: Waiter) -> bool:
    """True once ``lock`` could be taken within the bound (it is released again at once)."""
    if await acquire_within(lock, wait):
        lock.release()
        return True
    return False
