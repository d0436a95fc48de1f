"""Session churn against a provider's concurrent-connection quota: the cost of a close
that keeps its STT connection is that a later caller is refused, which this makes visible.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._runs import LayerForRun, cancel_since
from ..standins import ProviderServer
from ._server import SERVER_GRACE, upgrades, wait_until
from .agents import E2EAgent, E2EContext
from .catalogue import _TOOL_CALL
from .models import E2EModels, STTKind, make_e2e_session, make_models


@dataclass
class ChurnOutcome:
    """Sessions run one after another against an STT quota. ``connected[i]``: session
    ``i`` got its STT connection (the server accepted it). ``rejected``: quota refusals
    seen by the server; ``stt_errors``: STT errors the sessions' plugins reported."""

    patched: bool
    sessions: int
    quota: int
    connected: list[bool]
    stuck: list[bool]
    closed: list[bool]
    rejected: int
    stt_errors: int
    stt_open_end: int
    ms: float

    @property
    def all_connected(self) -> bool:
        return all(self.connected)


@dataclass
class _ChurnRun:
    """What the sessions of one churn left, so the cleanup reaches all of them. It saves
    the server switches the churn changes (quota, LLM script) for :meth:`release`."""

    server: ProviderServer
    stt: STTKind
    ctxs: list[E2EContext] = field(default_factory=list)
    models: list[E2EModels] = field(default_factory=list)
    closers: list[asyncio.Future[None]] = field(default_factory=list)
    connected: list[bool] = field(default_factory=list)
    stuck: list[bool] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._saved = (self.server.stt_quota, list(self.server.llm_script))

    def release(self) -> None:
        """Release every parked tool and put the server's switches back."""
        for c in self.ctxs:
            c.release.set()
        self.server.stt_quota = self._saved[0]
        self.server.llm_script[:] = self._saved[1]

    async def cleanup(self, before: set[asyncio.Task[Any]]) -> None:
        """Release, give the closes still running a moment, then cancel what the churn
        left behind and close every session's models: bounded."""
        self.release()
        pending = [c for c in self.closers if not c.done()]
        if pending:
            await asyncio.wait(pending, timeout=0.3)
        for c in pending:
            c.cancel()
        await cancel_since(before)
        await asyncio.gather(*(m.aclose() for m in self.models), return_exceptions=True)


async def _one_session(run: _ChurnRun, *, is_stuck: bool, limit: float, connect_wait: float) -> None:
    """Start one session, note whether the server let its STT connection in, park its tool
    (``is_stuck``) through the real LLM, and close it, waiting at most ``limit``."""
    server, kind = run.server, run.stt
    run.stuck.append(is_stuck)
    ctx = E2EContext()
    run.ctxs.append(ctx)
    server.llm_script[:] = list(_TOOL_CALL)
    models = make_models(server, kind)
    run.models.append(models)
    models.stt.on("error", run.errors.append)
    session, _audio = make_e2e_session(models)
    opens0, rej0 = upgrades(server, kind), server.rejected(kind)

    def upgraded() -> bool:
        return upgrades(server, kind) > opens0

    def refused() -> bool:
        return server.rejected(kind) > rej0

    await session.start(E2EAgent(ctx, tool="park" if is_stuck else "ok"))
    await wait_until(lambda: upgraded() or refused(), connect_wait)
    run.connected.append(upgraded() and not refused())
    if is_stuck:
        session.generate_reply(user_input="please look it up")
        await wait_until(ctx.tool_entered.is_set, 5.0)
    closer = asyncio.ensure_future(session.aclose())
    run.closers.append(closer)
    done, _ = await asyncio.wait({closer}, timeout=limit)
    run.closed.append(bool(done))


async def run_churn(
    *,
    patched: bool,
    server: ProviderServer,
    sessions: int = 6,
    quota: int = 3,
    stuck: Callable[[int], bool] = lambda i: i % 2 == 0,
    stt: STTKind = "inference_stt",
    drain_timeout: float = 0.3,
    close_timeout: float = 2.0,
    limit: float | None = None,
    connect_wait: float = 1.5,
) -> ChurnOutcome:
    """``sessions`` sessions in turn, those where ``stuck(i)`` with a tool parked forever
    (reached through the real LLM), each closed with ``aclose()`` (waited for at most
    ``limit``, default close bound + 1 s patched, 0.5 s vanilla) while ``server.stt_quota``
    is ``quota``. On vanilla every stuck session keeps its STT connection, so the quota
    runs out and later sessions are refused; with the layer each close frees it."""
    if limit is None:
        limit = close_timeout + 1.0 if patched else 0.5
    install = LayerForRun(patched, drain_timeout=drain_timeout, close_timeout=close_timeout)
    run = _ChurnRun(server, stt)
    server.stt_quota = quota
    rejected0 = server.rejected(stt)
    before = set(asyncio.all_tasks())
    t0 = time.monotonic()
    try:
        for i in range(sessions):
            await _one_session(run, is_stuck=stuck(i), limit=limit, connect_wait=connect_wait)
        await asyncio.sleep(SERVER_GRACE)
        return ChurnOutcome(
            patched=patched,
            sessions=sessions,
            quota=quota,
            connected=run.connected,
            stuck=run.stuck,
            closed=run.closed,
            rejected=server.rejected(stt) - rejected0,
            stt_errors=len(run.errors),
            stt_open_end=server.open_connections(stt),
            ms=round((time.monotonic() - t0) * 1000, 1),
        )
    finally:
        try:
            await run.cleanup(before)
        finally:
            install.restore()
