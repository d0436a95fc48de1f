"""End-to-end ``FallbackAdapter`` scenarios: a provider refused once and is being
recovered when the session closes.

* ``stt_recovery``: ``stt.FallbackAdapter([primary, secondary])`` with the real Deepgram and
  Inference STT plugins (either order) on one stand-in server. The primary is refused
  (HTTP 503) until the adapter marks it unavailable, then back: its recovery stream opens
  and, fed the caller's silence, stays open waiting for a final transcript.
* ``tts_probe_on_close``: ``tts.FallbackAdapter`` over two real Inference TTS plugins, the
  primary on a second stand-in server. It is refused during the first reply (the attempt
  and that reply's probe), then back; the second reply is still streaming when the session
  closes, and the close's cancel runs the stream's ``finally``, which starts a probe.
* ``tts_probe_in_flight``: as above, but once refused the primary hangs (``no_handshake``):
  the first reply's probe is still connecting when the session closes.

The verdict is the failed provider's: the connections it holds a second after the close
returned, the requests it got after the close began, and the adapter's recovery tasks left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import AgentSession, APIConnectOptions, stt, tts

import livekit_safeclose as lsc

from ... import fallback as fallback_mod
from .._runs import LayerForRun, cancel_since, close_ended
from ..standins import Kind, ProviderServer
from ._server import SERVER_GRACE, wait_until
from .agents import E2EAgent, E2EContext
from .catalogue import E2E_SCENARIOS, E2EScenario, FallbackCase
from .models import E2EModels, STTKind, make_e2e_session, make_models, make_stt, make_tts

#: a TTS attempt (and a probe's connect) may take this long: well past the observation
#: window, so a probe left running is still connecting when it is counted
FALLBACK_CONN_OPTIONS = APIConnectOptions(timeout=5.0, max_retry=1, retry_interval=0.1)


def refuse_until_unavailable(
    server: ProviderServer, kind: Kind, adapter: Any, then: Callable[[], None] | None = None
) -> None:
    """``server`` refuses ``kind`` until ``adapter`` marks a provider unavailable, then lets
    it back (or runs ``then``), before the adapter starts its recovery."""
    server.refuse_kinds = server.refuse_kinds | {kind}
    event = (
        "tts_availability_changed" if isinstance(adapter, tts.FallbackAdapter) else "stt_availability_changed"
    )

    def changed(ev: Any) -> None:
        if not ev.available:
            server.refuse_kinds = server.refuse_kinds - {kind}
            if then is not None:
                then()

    adapter.on(event, changed)


def make_stt_fallback(
    server: ProviderServer, primary: STTKind, http: Any
) -> tuple[stt.FallbackAdapter, list[stt.STT[Any]]]:
    """The real STT plugins in a ``FallbackAdapter``, ``primary`` first, the primary refused
    until the adapter gives up on it. No retries: one refusal fails an instance over."""
    secondary: STTKind = "inference_stt" if primary == "deepgram_stt" else "deepgram_stt"
    inner = [make_stt(server, primary, http), make_stt(server, secondary, http)]
    adapter = stt.FallbackAdapter(inner, max_retry_per_stt=0, retry_interval=0.1, attempt_timeout=2.0)
    refuse_until_unavailable(server, primary, adapter)
    return adapter, inner


@dataclass
class FallbackOutcome:
    """What one run observed, counted by the failed (primary) provider's server.

    ``primary_open_at_close``: its open connections ``SERVER_GRACE`` after the close
    returned; ``primary_open_after``: ``observe`` seconds after; ``requests_after_close``:
    requests it got after the close began; ``recovery_tasks_left``: the adapter's recovery
    tasks still running then."""

    scenario: str
    primary: str
    patched: bool
    graceful: bool
    closed: bool
    ms: float
    engaged: bool
    primary_open_before: int
    primary_open_at_close: int
    primary_open_after: int
    requests_after_close: int
    recovery_tasks_left: int
    close_events: int
    report: Any = None
    error: str = ""
    events: list[str] = field(default_factory=list)

    @property
    def released(self) -> bool:
        return self.closed and self.primary_open_after == 0 and self.recovery_tasks_left == 0

    def summary(self) -> str:
        mode = ("layer" if self.patched else "vanilla") + (", graceful" if self.graceful else "")
        closed = f"closed in {self.ms:.0f} ms" if self.closed else f"NOT closed after {self.ms:.0f} ms"
        return (
            f"{self.scenario}[{self.primary}, {mode}]: {closed}; primary open before="
            f"{self.primary_open_before} at_close={self.primary_open_at_close} after="
            f"{self.primary_open_after}, requests after close={self.requests_after_close}; "
            f"recovery tasks left={self.recovery_tasks_left}; close_events={self.close_events}"
            + (f"; error={self.error}" if self.error else "")
            + f"; primary events={self.events}"
        )

    def as_row(self, scenario_id: str) -> dict[str, Any]:
        """The row ``livekit-safeclose check --e2e`` prints for this run."""
        return {
            "scenario": scenario_id,
            "closed": self.closed,
            "ms": self.ms,
            "provider_open": self.primary_open_after,
            "server_primary_open_at_close": self.primary_open_at_close,
            "server_primary_open_after": self.primary_open_after,
            "server_requests_after_close": self.requests_after_close,
            "close_events": self.close_events,
            "tasks_left": self.recovery_tasks_left,
            "clean": self.released and self.close_events == 1 and not self.error,
            "error": self.error,
            "report": self.report.to_dict() if self.report is not None else None,
        }


@dataclass
class _Run:
    sc: E2EScenario
    case: FallbackCase
    server: ProviderServer
    primary_server: ProviderServer
    primary_kind: Kind
    ctx: E2EContext = field(default_factory=E2EContext)
    models: E2EModels | None = None
    adapter: Any = None
    inner: list[Any] = field(default_factory=list)
    closes: list[Any] = field(default_factory=list)
    text_consumed: asyncio.Event = field(default_factory=asyncio.Event)
    err: str = ""

    async def parked_text(self) -> AsyncIterator[str]:
        """A reply the LLM is still streaming: one sentence, then nothing until released."""
        yield "Hello there, this is the start of a long answer. "
        self.text_consumed.set()
        await self.ctx.release.wait()
        yield "That is all."


def _build(run: _Run, primary: STTKind) -> tuple[AgentSession[Any], Any]:
    run.models = models = make_models(run.server, "inference_stt")
    if run.case == "stt_recovery":
        run.adapter, run.inner = make_stt_fallback(run.server, primary, models.http)
        models.stt = run.adapter
    else:
        psrv = run.primary_server
        run.inner = [make_tts(psrv, models.http), models.tts]
        run.adapter = tts.FallbackAdapter(run.inner, max_retry_per_tts=0)

        def hang() -> None:
            psrv.stall, psrv.stall_kinds = "no_handshake", frozenset({"inference_tts"})

        if run.case == "tts_probe_in_flight":
            refuse_until_unavailable(psrv, "inference_tts", run.adapter, then=hang)
        else:  # refused until the first reply's probe was, then back (see _engage)
            psrv.refuse_kinds = frozenset({"inference_tts"})
        models.tts = run.adapter
    session, audio = make_e2e_session(models, conn_options=FALLBACK_CONN_OPTIONS)
    session.on("close", run.closes.append)
    return session, audio


async def _engage(run: _Run, session: AgentSession[Any]) -> bool:
    """Start the session and bring the scenario to the moment the close must meet."""
    psrv, kind = run.primary_server, run.primary_kind
    await session.start(E2EAgent(run.ctx))
    if run.case == "stt_recovery":
        # the main stream on the secondary, the recovery stream on the primary
        secondary: Kind = "inference_stt" if kind == "deepgram_stt" else "deepgram_stt"
        return await run.server.await_open(secondary, 1, 10.0) and await psrv.await_open(kind, 1, 10.0)
    await asyncio.wait_for(session.say("hello there").wait_for_playout(), 10.0)
    if run.case == "tts_probe_in_flight":
        return await psrv.await_open(kind, 1, 5.0)  # the probe, still connecting
    # that reply's probe was refused too: the primary is unavailable, and back from now on
    refused = await wait_until(lambda: _probed(run.adapter), 5.0)
    psrv.refuse_kinds = frozenset()
    session.say(run.parked_text())
    consumed = await wait_until(run.text_consumed.is_set, 5.0)
    await asyncio.sleep(0.2)  # the fallback stream has read the sentence
    return refused and consumed


def _probed(adapter: Any) -> bool:
    """A probe was started and has ended."""
    tasks = fallback_mod.recovery_tasks(adapter)
    return bool(tasks) and all(t.done() for t in tasks)


def _live_recoveries(run: _Run) -> list[asyncio.Task[Any]]:
    return [t for t in fallback_mod.recovery_tasks(run.adapter) if not t.done()]


async def _close(
    run: _Run, session: AgentSession[Any], *, graceful: bool, limit: float
) -> tuple[bool, float]:
    """Close the session (``aclose()``, or ``shutdown(drain=True)`` with the parked reply
    released so it ends within the drain); True when the close ended within ``limit``."""
    t0 = time.monotonic()
    if graceful:
        session.shutdown(drain=True)
        run.ctx.release.set()
        closed = await wait_until(lambda: bool(run.closes), limit)
    else:
        closer = asyncio.ensure_future(session.aclose())
        done, _ = await asyncio.wait({closer}, timeout=limit)
        closed = bool(done) and closer.exception() is None
        if not closed:
            closer.cancel()
    if closed and lsc.installed_options() is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(close_ended(session), limit)
    return closed, (time.monotonic() - t0) * 1000


@contextlib.contextmanager
def _primary_server(case: FallbackCase, server: ProviderServer) -> Iterator[ProviderServer]:
    """The STT providers share ``server``; the failing TTS gets a server of its own."""
    if case == "stt_recovery":
        saved = server.refuse_kinds
        try:
            yield server
        finally:
            server.refuse_kinds = saved
        return
    with ProviderServer() as own:
        yield own


async def run_fallback_scenario(
    name: str | E2EScenario,
    *,
    patched: bool,
    server: ProviderServer,
    primary: STTKind = "deepgram_stt",
    graceful: bool = False,
    drain_timeout: float = 0.5,
    close_timeout: float = 3.0,
    limit: float | None = None,
    observe: float = 1.0,
) -> FallbackOutcome:
    """Run one fallback scenario (layer or vanilla) in the current loop against ``server``.

    ``primary``: for ``stt_recovery``, the STT plugin that is refused once (the other one
    serves). ``limit``: how long the close may take (default: close bound + 1 s). Whatever
    the outcome, what the run left is cancelled and the plugins are closed (bounded)."""
    sc = E2E_SCENARIOS[name] if isinstance(name, str) else name
    assert sc.fallback is not None, f"{sc.id} is not a fallback scenario"
    case: FallbackCase = sc.fallback
    limit = close_timeout + 1.0 if limit is None else limit
    install = LayerForRun(patched, drain_timeout=drain_timeout, close_timeout=close_timeout)
    before = set(asyncio.all_tasks())
    kind: Kind = primary if case == "stt_recovery" else "inference_tts"
    try:
        with _primary_server(case, server) as psrv:
            run = _Run(sc, case, server, psrv, kind)
            try:
                session, _audio = _build(run, primary)
                engaged = await _engage(run, session)
                return await _observe(run, session, engaged, patched=patched, graceful=graceful,
                                      limit=limit, observe=observe)  # fmt: skip
            finally:
                await _cleanup(run, before)
    finally:
        install.restore()


async def _observe(
    run: _Run,
    session: AgentSession[Any],
    engaged: bool,
    *,
    patched: bool,
    graceful: bool,
    limit: float,
    observe: float,
) -> FallbackOutcome:
    psrv, kind = run.primary_server, run.primary_kind
    open_before, total_before = psrv.open_connections(kind), psrv.total_connections(kind)
    closed, ms = await _close(run, session, graceful=graceful, limit=limit)
    t_end = time.monotonic()
    await asyncio.sleep(SERVER_GRACE)
    at_close = psrv.open_connections(kind)
    await asyncio.sleep(max(0.0, t_end + observe - time.monotonic()))
    return FallbackOutcome(
        scenario=run.sc.id,
        primary=kind,
        patched=patched,
        graceful=graceful,
        closed=closed,
        ms=round(ms, 1),
        engaged=engaged,
        primary_open_before=open_before,
        primary_open_at_close=at_close,
        primary_open_after=psrv.open_connections(kind),
        requests_after_close=psrv.total_connections(kind) - total_before,
        recovery_tasks_left=len(_live_recoveries(run)),
        close_events=len(run.closes),
        report=lsc.last_close_report(session) if patched else None,
        error=run.err if engaged else (run.err or "scenario not engaged"),
        events=psrv.events(kind),
    )


async def _cleanup(run: _Run, before: set[asyncio.Task[Any]]) -> None:
    """Release what is parked, stop what the run left, close the adapter and its plugins."""
    run.ctx.release.set()
    await cancel_since(before)
    closers = [asyncio.ensure_future(m.aclose()) for m in run.inner]
    if closers:
        await asyncio.wait(closers, timeout=1.0)
        for c in closers:
            c.cancel()
            if c.done() and not c.cancelled():
                c.exception()
    if run.models is not None:
        await run.models.aclose()
