"""``FallbackAdapter`` recovery (STT and TTS) ends with the session that started it.

When a provider fails, upstream's fallback streams start a recovery task that probes it: the
STT one keeps a stream to the failed provider open (fed the caller's audio) until it hears a
final transcript, the TTS one synthesizes the last text again. The task lives in the
*adapter*'s per-provider status, not in the stream: only ``FallbackAdapter.aclose()`` cancels
it, and a session does not close its models. So a session closed while a provider recovers
leaves a socket open at that provider (the Deepgram plugin keeps an idle one alive with
``KeepAlive``), and the TTS stream's ``finally``, which starts the probes, opens a request to
the failed provider when the close interrupts it.

The layer wraps the streams' ``_try_recovery``: a recovery it starts is noted with the
session the stream works for (the stream ledger knows it), and none is started while that
session closes or after it closed. At the end of the close, :func:`finish` (a
:data:`~livekit_safeclose.completion.FINISHERS` entry) cancels the session's recoveries still
running, bounded, and lists them and the streams they held in the report. The adapter itself
is never closed: another running session may use it, and its next stream starts a recovery
of its own.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from . import streams as streams_mod
from .bounded_close import BoundedClose, closing_of
from .report import logger


@dataclass
class _Recovery:
    task: asyncio.Task[Any]
    session_ref: weakref.ReferenceType[Any]
    provider: str

    @property
    def session(self) -> Any:
        return self.session_ref()


#: recovery tasks started on a session's behalf, until they end
_recoveries: dict[asyncio.Task[Any], _Recovery] = {}


def recovery_tasks(adapter: Any) -> set[asyncio.Task[Any]]:
    """Every task in a ``FallbackAdapter``'s per-provider status slots (their names vary by
    release), done or not."""
    out: set[asyncio.Task[Any]] = set()
    for status in getattr(adapter, "_status", None) or ():
        out.update(v for v in getattr(status, "__dict__", {}).values() if isinstance(v, asyncio.Task))
    return out


def _status_tasks(stream: Any) -> set[asyncio.Task[Any]]:
    return recovery_tasks(getattr(stream, "_fallback_adapter", None))


def _closing(session: Any) -> bool:
    """The session's close is in flight, or it closed and was not started again."""
    if closing_of(session) is not None:
        return True
    return closing_of(session, live_only=False) is not None and not session._started


def _label(provider: Any) -> str:
    return str(getattr(provider, "label", type(provider).__name__))


def _track(task: asyncio.Task[Any], session: Any, provider: Any) -> None:
    _recoveries[task] = _Recovery(task, weakref.ref(session), _label(provider))
    task.add_done_callback(lambda t: _recoveries.pop(t, None))


def wrap_try_recovery(original: Callable[..., Any], _options: Any) -> Callable[..., Any]:
    """A patch-table factory for the fallback streams' ``_try_recovery(provider)``."""

    @functools.wraps(original)
    def _try_recovery(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            session = streams_mod.session_of(self)
        except Exception:  # the bookkeeping must never break upstream's failover
            logger.debug("fallback: could not attribute %r", self, exc_info=True)
            session = None
        if session is None:
            return original(self, *args, **kwargs)
        provider = args[0] if args else next(iter(kwargs.values()), None)
        if _closing(session):
            close = closing_of(session)
            if close is not None:
                close.record("fallback.recovery_not_started", time.monotonic(), "done", _label(provider))
            return None
        before = _status_tasks(self)
        result = original(self, *args, **kwargs)
        for task in _status_tasks(self) - before:
            if not task.done():
                _track(task, session, provider)
        return result

    return _try_recovery


def recoveries_of(session: Any) -> list[asyncio.Task[Any]]:
    """The recovery tasks still running on ``session``'s behalf."""
    return [r.task for r in list(_recoveries.values()) if r.session is session and not r.task.done()]


def finish(session: Any, close: BoundedClose) -> Coroutine[Any, Any, None] | None:
    """Cancel the session's recoveries still running (bounded: one unwind grace) and list
    them, with the streams they held, in the close report; ``None`` when none runs."""
    tasks = recoveries_of(session)
    return _cancel_recoveries(session, close, tasks) if tasks else None


async def _cancel_recoveries(session: Any, close: BoundedClose, tasks: list[asyncio.Task[Any]]) -> None:
    start = time.monotonic()
    # the recovery stream (STT) or the probe's stream (TTS) ends with its task; a stream of
    # the session still open at this point and closed by these cancels is one of them
    held = [e for e in streams_mod.streams_of(session) if not e.task.done()]
    providers = sorted({_recoveries[t].provider for t in tasks if t in _recoveries})
    live = close.cancel(tasks)
    if live:
        await asyncio.wait(live, timeout=close.left(close.grace()))
    stuck = close.mark_zombies([t for t in live if not t.done()])
    close.note_closed_by_force([e.label for e in held if e.task.done()])
    detail = ", ".join(providers) + (f"; {len(stuck)} did not end" if stuck else "")
    close.record("fallback.recovery.cancel", start, "timeout" if stuck else "done", detail)
