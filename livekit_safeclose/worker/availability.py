"""Draining means unavailable, from the moment the signal arrives.

Upstream's ``AgentServer`` only becomes unavailable when ``drain()`` sets ``_draining``: a
few loop iterations after the signal, or only once a blocked loop resumes. A job offered in
that window is accepted, and so is any request whose ``request_fnc`` answers after the
signal; each keeps the old worker alive for a whole job. With this part the worker answers
unavailable (``_is_available``) and reports ``WS_FULL`` (``_update_worker_status``) as soon as
the tap saw the signal, and (``reject_late_accepts``, default) a request still in
``request_fnc`` when the drain began is answered ``available=False, terminate=False``, so the
server offers it elsewhere. Jobs already accepted or running are never touched.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ..options import Options, in_force
from . import servers
from .signals import drain_requested

logger = logging.getLogger("livekit.agents.safeclose")


def wrap_is_available(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``AgentServer._is_available``."""

    @functools.wraps(original)
    def _is_available(self: Any) -> bool:
        servers.remember(self)
        if drain_requested():
            return False
        return bool(original(self))

    return _is_available


async def _report_full(server: Any) -> None:
    from livekit.protocol import agent as agent_pb

    update = agent_pb.UpdateWorkerStatus(
        status=agent_pb.WorkerStatus.WS_FULL, job_count=len(server.active_jobs)
    )
    try:
        await server._queue_msg(agent_pb.WorkerMessage(update_worker=update))
    except Exception:  # the channel closed while shutting down: nothing to report to
        logger.debug("could not report WS_FULL", exc_info=True)


def wrap_update_worker_status(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``AgentServer._update_worker_status``."""

    @functools.wraps(original)
    async def _update_worker_status(self: Any) -> None:
        servers.remember(self)
        if drain_requested() and not self.draining:
            await _report_full(self)
            return
        await original(self)

    return _update_worker_status


def wrap_accept(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``JobRequest.accept``."""

    @functools.wraps(original)
    async def accept(self: Any, *args: Any, **kwargs: Any) -> None:
        opts = in_force()
        if opts is not None and opts.reject_late_accepts and (drain_requested() or servers.any_draining()):
            logger.info(
                "worker is draining: job %s accepted after the drain began is answered "
                "unavailable so the server can offer it elsewhere",
                getattr(self, "id", "?"),
            )
            await self.reject(terminate=False)
            return
        await original(self, *args, **kwargs)

    return accept
