"""Work a signal handler hands over, run later where it is safe.

A Python-level signal handler runs on the main thread between two bytecodes of whatever
that thread was doing: possibly inside ``logging`` (holding a handler's lock) or inside
``threading`` (holding its bookkeeping locks). Logging or starting a thread there can
deadlock or corrupt what was interrupted. So the layer's handler only sets flags and calls
:func:`later`; the work runs on the event loop (``loop.call_soon_threadsafe``) or, when no
loop runs on that thread, at the next safe point that calls :func:`flush` (the start of a
drain, a worker close, the end of the CLI's worker run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("livekit.agents.safeclose")

_pending: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()


def later(fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` soon, outside the signal handler. Safe in a signal handler: one
    deque append and one ``call_soon_threadsafe``."""
    _pending.append((fn, args))
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop runs on this thread: the next flush() runs it
    with contextlib.suppress(RuntimeError):  # the loop is closing
        loop.call_soon_threadsafe(flush)


def flush() -> None:
    """Run what signal handlers handed over, oldest first (never from a signal handler)."""
    while _pending:
        try:
            fn, args = _pending.popleft()
        except IndexError:  # emptied by a nested flush
            return
        try:
            fn(*args)
        except Exception:
            logger.exception(
                "livekit-safeclose: deferred signal work %s failed", getattr(fn, "__qualname__", fn)
            )


def pending() -> int:
    """How many pieces of work wait for a flush (for tests and diagnostics)."""
    return len(_pending)
