"""The job side of a forced end of drain (in each job process).

``_JobProc._shutdown_job`` is upstream's shutdown sequence: it waits up to 15 s for a running
entrypoint, then up to ``_SESSION_ACLOSE_TIMEOUT`` (60 s) for ``session.aclose()``. With a
``ShutdownRequest`` whose reason starts with :data:`~.bounds.FORCED_REASON_PREFIX` (sent by
:mod:`.drain_end`), the session is closed first, at once, with the layer's forced close
(bounded by ``close_timeout``, so provider streams say goodbye); a still-running entrypoint
is cancelled instead of awaited, and ``on_session_end`` gets at most
:data:`~.bounds.FORCED_END_GRACE`. Any other reason runs upstream's sequence untouched.
With the ``bounded_teardown`` part every step after the session close is bounded too
(:mod:`.teardown`). Every shutdown ends with one INFO line of what the process still runs (:mod:`.leftovers`).

The session guard (``_SESSION_ACLOSE_TIMEOUT``) becomes ``close_timeout +``
:data:`~.bounds.SESSION_GUARD_MARGIN` for every shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from ..options import Options
from . import bounds, teardown
from .leftovers import current_job, log_leftovers

logger = logging.getLogger("livekit.agents.safeclose")


class SessionGuard(float):
    """``_SESSION_ACLOSE_TIMEOUT`` as the layer sets it: a float that knows what it replaced."""

    __wrapped__: Any


def session_guard(original: Any, options: Options) -> SessionGuard:
    """Patch-table factory for ``job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT`` (remade when
    ``close_timeout`` changes)."""
    value = SessionGuard(options.close_timeout + bounds.SESSION_GUARD_MARGIN)
    value.__wrapped__ = original
    return value


async def _close_session(session: Any, bound: float) -> None:
    closer = asyncio.ensure_future(session.aclose())
    await asyncio.wait({closer}, timeout=bound)
    if not closer.done():
        logger.error(
            "session close did not return within %.1fs; is livekit_safeclose.install() called in the agent file?",
            bound,
        )
    elif not closer.cancelled() and (exc := closer.exception()) is not None:
        logger.warning("session close raised %r", exc, exc_info=exc)


async def _forced_session_close(job: Any, job_entry_task: asyncio.Task[Any], reason: str) -> None:
    """Close the session now with the layer's forced close (bounded), do not wait 15 s for a
    running entrypoint, and cap ``on_session_end`` at FORCED_END_GRACE."""
    _ctx, session = current_job()
    ct = bounds.close_timeout()
    logger.warning(
        "worker forced this job's shutdown (%s): closing the session now, bounded by close_timeout=%.1fs",
        reason,
        ct,
        extra={"safeclose_forced_reason": reason},
    )
    if session is not None:
        await _close_session(session, ct + bounds.SESSION_GUARD_MARGIN)
    if not job_entry_task.done():  # it had the session close to finish on its own
        job_entry_task.cancel()
        await asyncio.wait({job_entry_task}, timeout=bounds.ENTRYPOINT_UNWIND)
    job._session_end_timeout = min(float(job._session_end_timeout), bounds.FORCED_END_GRACE)


def wrap_shutdown_job(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``_JobProc._shutdown_job``."""

    @functools.wraps(original)
    async def _shutdown_job(self: Any, job_entry_task: asyncio.Task[Any], shutdown_info: Any) -> None:
        reason = str(getattr(shutdown_info, "reason", "") or "")
        try:
            if reason.startswith(bounds.FORCED_REASON_PREFIX):
                await _forced_session_close(self, job_entry_task, reason)
            with teardown.bounded_steps(self):
                await original(self, job_entry_task, shutdown_info)
        finally:
            log_leftovers(reason)

    return _shutdown_job
