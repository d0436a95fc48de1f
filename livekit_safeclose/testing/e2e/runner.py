"""Running one end-to-end scenario: start a session on the real plugins, engage its fault,
close it with ``aclose()`` and watch the stand-in server while and after it closes.

The verdict is the provider's: what the server still holds once the close returned (or
hung), so a close that "returns" while the socket lives on is caught.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import AgentSession
from livekit.agents.voice.events import CloseReason

import livekit_safeclose as lsc

from ...ownership import activities_of, objects_of
from .._runs import LayerForRun, cancel_since
from ..mcp import MCPStandin
from ..standins import KINDS, ProviderServer
from . import mcp as mcp_side
from ._server import POLL, SERVER_GRACE, counts, wait_until
from .agents import E2EAgent, E2EContext
from .audio import ScriptedAudioInput
from .catalogue import E2E_SCENARIOS, E2EScenario, Trigger
from .mcp import MCPSeen
from .models import E2EModels, STTKind, make_e2e_session, make_models
from .outcome import E2EOutcome


@dataclass
class _E2ERun:
    """One run's moving parts, so the cleanup reaches them whatever step failed. It saves
    the server switches the run changes (stall, LLM script) for :meth:`release`."""

    sc: E2EScenario
    server: ProviderServer
    stt: STTKind
    ctx: E2EContext = field(default_factory=E2EContext)
    models: E2EModels | None = None
    mcp: MCPStandin | None = None
    closer: asyncio.Future[None] | None = None
    closes: list[Any] = field(default_factory=list)
    err: str = ""

    def __post_init__(self) -> None:
        s = self.server
        self._saved = (s.stall, s.stall_kinds, list(s.llm_script))
        self._saved_realtime = (list(s.realtime_script), s.realtime_item_delay)

    def stall(self) -> None:
        """The stand-in stalls the scenario's stalled kind the scenario's way."""
        assert self.sc.stall is not None
        self.server.stall_kinds = frozenset({self.sc.stall[0]})
        self.server.stall = self.sc.stall_mode

    def release(self) -> None:
        """Release what the agent parked and put the server's switches back."""
        self.ctx.release.set()
        self.server.stall, self.server.stall_kinds = self._saved[0], self._saved[1]
        self.server.llm_script[:] = self._saved[2]
        self.server.realtime_script[:], self.server.realtime_item_delay = self._saved_realtime


@dataclass
class _CloseSeen:
    """What the server showed around the close; see :class:`E2EOutcome` for the fields."""

    ms: float
    closed: bool
    stt_before: int
    at_close: int
    zero_ms: float | None
    total_at_close: int
    total_at_end: int
    realtime_at_close: int = 0
    left: list[str] = field(default_factory=list)


class _FirstZero:
    """The first moment (ms since ``t0``) the server held no STT connection of ``kind``."""

    def __init__(self, server: ProviderServer, kind: STTKind, t0: float) -> None:
        self._server, self._kind, self._t0 = server, kind, t0
        self.ms: float | None = None

    def poll(self) -> None:
        if self.ms is None and self._server.open_connections(self._kind) == 0:
            self.ms = round((time.monotonic() - self._t0) * 1000, 1)


async def _cleanup(before: set[asyncio.Task[Any]], run: _E2ERun) -> None:
    """Release what is parked, stop what is left of the run (the MCP stand-in's child
    first: the MCP client's tasks drain its pipes), close the models: bounded."""
    run.release()
    closer = run.closer
    if closer is not None and not closer.done():
        await asyncio.wait({closer}, timeout=0.3)
        closer.cancel()
    if run.mcp is not None and run.mcp.stdio is not None:
        run.mcp.stdio.kill()
    await cancel_since(before)
    await mcp_side.stop_standin(run.mcp)
    if run.models is not None:
        await run.models.aclose()


async def _trigger(session: AgentSession[Any], audio: ScriptedAudioInput, how: Trigger) -> None:
    if how == "voice":
        # 0.8 s of "speech": the stand-in sends a final after 0.5 s of voice, Silero
        # hears the tone, and the turn ends on the silence that follows
        await audio.speak(0.8)
    elif how == "text":
        session.generate_reply(user_input="please look it up")


def _engaged_check(run: _E2ERun) -> Callable[[], bool]:
    sc, ctx, server, standin = run.sc, run.ctx, run.server, run.mcp
    if sc.engaged == "mcp_call":
        assert standin is not None
        return lambda: standin.calls() >= 1
    if sc.engaged == "tool":
        return ctx.tool_entered.is_set
    if sc.engaged == "llm_open":
        return lambda: server.open_connections("llm") >= 1
    if sc.engaged == "realtime_open":
        return lambda: server.open_connections("openai_realtime") >= 1
    if sc.engaged == "llm_done":
        # the reply's text was streamed in full: it is in the (stalled) TTS stream now
        return lambda: any(e.startswith("closed#") and e.endswith(":clean") for e in server.events("llm"))
    return lambda: True


async def _start_engaged(
    run: _E2ERun, trigger: Trigger
) -> tuple[AgentSession[Any], ScriptedAudioInput, bool]:
    """Start the session on the real plugins, trigger the scenario and wait (bounded) until
    its fault is engaged: (session, audio input, engaged). A miss is noted in ``run.err``."""
    sc, server = run.sc, run.server
    if sc.realtime:
        server.realtime_script[:] = list(sc.script)
        server.realtime_item_delay = sc.item_delay
    else:
        server.llm_script[:] = list(sc.script)
    if sc.stall is not None and sc.stall[1] == "before_start":
        run.stall()
    run.models = make_models(server, run.stt, realtime=sc.realtime)
    run.mcp = mcp_side.start_standin(sc)
    agent_tools, session_kwargs = mcp_side.tools_for(sc, run.mcp)
    session, audio = make_e2e_session(run.models, **session_kwargs)
    session.on("close", run.closes.append)
    await session.start(E2EAgent(run.ctx, tool=sc.tool, on_exit=sc.on_exit, tools=agent_tools))
    if not await server.await_open(run.stt, 1, 5.0):
        run.err = f"no {run.stt} connection after start"
    if sc.stall is not None and sc.stall[1] == "before_trigger":
        run.stall()
    await _trigger(session, audio, trigger)
    engaged = await wait_until(_engaged_check(run), 10.0)
    if not engaged and not run.err:
        run.err = f"scenario not engaged ({sc.engaged})"
    await asyncio.sleep(0.1)
    return session, audio, engaged


async def _close_and_watch(
    run: _E2ERun,
    session: AgentSession[Any],
    audio: ScriptedAudioInput,
    *,
    limit: float,
    observe: float,
    mute_on_close: bool,
) -> _CloseSeen:
    """``aclose()``, waited for at most ``limit`` (a hung close is left running), while
    the server's STT count is watched; then ``observe`` seconds more of watching."""
    server, kind = run.server, run.stt
    stt_before = server.open_connections(kind)
    total_at_close = server.total_connections(kind)
    t0 = time.monotonic()
    if mute_on_close or run.sc.path == "disconnect":
        audio.mode = "mute"
    closer = run.closer = asyncio.ensure_future(_close(session, run.sc.path))
    zero = _FirstZero(server, kind, t0)
    while not closer.done() and time.monotonic() - t0 < limit:
        zero.poll()
        await asyncio.wait({closer}, timeout=POLL)
    ms = (time.monotonic() - t0) * 1000
    closed = closer.done() and not closer.cancelled() and closer.exception() is None
    if closer.done() and not closer.cancelled() and (exc := closer.exception()) is not None:
        run.err = run.err or repr(exc)
    t_end = time.monotonic()
    total_at_end = server.total_connections(kind)
    await asyncio.sleep(SERVER_GRACE)
    realtime_at_close = server.open_connections("openai_realtime")
    left = _left_running(session)
    at_close = await _observe(zero, server, kind, t_end, observe)
    return _CloseSeen(
        ms, closed, stt_before, at_close, zero.ms, total_at_close, total_at_end, realtime_at_close, left
    )


async def _close(session: AgentSession[Any], path: str) -> None:
    """Close the session by ``path``: ``aclose()``, ``shutdown(drain=False)``, or
    close-on-disconnect as room io does it when the linked participant (a SIP caller) hangs
    up; the last two awaited through the closing task they start."""
    if path == "aclose":
        await session.aclose()
        return
    if path == "shutdown":
        session.shutdown(drain=False)
    else:
        session._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
    task = session._closing_task
    if task is not None:
        await asyncio.shield(task)


def _left_running(session: AgentSession[Any]) -> list[str]:
    """What the post-close audit finds still running for ``session`` (zombies included)."""
    from ...audit import audit

    found = audit(session)
    return [t.name for t in found.tasks + found.zombies]


async def _observe(
    zero: _FirstZero, server: ProviderServer, kind: STTKind, t_end: float, observe: float
) -> int:
    """Watch the server until ``observe`` s past ``t_end``; return its open STT count
    ``SERVER_GRACE`` after ``t_end`` (the count the close left behind)."""
    at_close: int | None = None
    while True:
        zero.poll()
        now = time.monotonic()
        if at_close is None and now >= t_end + SERVER_GRACE:
            at_close = server.open_connections(kind)
        if at_close is not None and now >= t_end + observe:
            return at_close
        await asyncio.sleep(POLL / 2)


def _outcome(
    run: _E2ERun,
    session: AgentSession[Any],
    seen: _CloseSeen,
    start: dict[str, dict[Any, int]],
    *,
    patched: bool,
    engaged: bool,
    mcp: MCPSeen | None,
) -> E2EOutcome:
    server, kind = run.server, run.stt
    end = counts(server)
    return E2EOutcome(
        scenario=run.sc.id,
        stt=kind,
        patched=patched,
        closed=seen.closed,
        ms=round(seen.ms, 1),
        engaged=engaged,
        stt_open_before=seen.stt_before,
        stt_open_at_close=seen.at_close,
        stt_open_after=server.open_connections(kind),
        stt_zero_ms=seen.zero_ms,
        stt_connections=end["total"][kind] - start["total"][kind],
        stt_reconnects_during_close=seen.total_at_end - seen.total_at_close,
        stt_reconnects_after_close=server.total_connections(kind) - seen.total_at_end,
        tts_open_after=server.open_connections("inference_tts"),
        llm_open_after=server.open_connections("llm"),
        clean_closes={k: end["clean"][k] - start["clean"][k] for k in KINDS},
        rejected=end["rejected"][kind] - start["rejected"][kind],
        close_events=len(run.closes),
        report=lsc.last_close_report(session) if patched else None,
        error=run.err,
        events={k: server.events(k) for k in KINDS},
        realtime_open_at_close=seen.realtime_at_close,
        realtime_open_after=server.open_connections("openai_realtime"),
        tasks_left=len(seen.left),
        tasks_left_names=seen.left,
        mcp=mcp,
    )


async def _observe_mcp(standin: MCPStandin | None, owned: set[int]) -> MCPSeen | None:
    return await mcp_side.observe(standin, owned) if standin is not None else None


async def run_e2e_scenario(
    name: str | E2EScenario,
    *,
    patched: bool,
    server: ProviderServer,
    stt: STTKind = "inference_stt",
    drain_timeout: float = 0.5,
    close_timeout: float = 3.0,
    limit: float | None = None,
    observe: float | None = None,
    trigger: Trigger | None = None,
    mute_on_close: bool = False,
) -> E2EOutcome:
    """Run one end-to-end scenario in the current event loop against ``server`` (which
    the caller started and will stop; switches this run sets are restored after).

    ``patched``: install the layer for the run (the previous install state is restored
    after). ``limit``: how long to wait for ``aclose()`` before calling it hung (default:
    close bound + 1 s patched, 1 s vanilla). ``observe``: how long to keep watching the
    server after the close returned or hung (default: ``close_timeout`` patched, 0 s
    vanilla). ``trigger`` overrides the scenario's (e.g. ``"text"`` for speed).
    ``mute_on_close``: the caller hangs up as the close starts (no more audio frames).
    Whatever the outcome, the stuck tool/hook is released and the session's leftovers are
    cancelled before returning (bounded)."""
    sc = E2E_SCENARIOS[name] if isinstance(name, str) else name
    if sc.fallback is not None:
        raise ValueError(f"{sc.id} is a FallbackAdapter scenario: use run_fallback_scenario")
    if limit is None:
        limit = close_timeout + 1.0 if patched or not sc.vanilla_hangs else 1.0
    if observe is None:
        observe = close_timeout if patched else 0.0
    install = LayerForRun(patched, drain_timeout=drain_timeout, close_timeout=close_timeout)
    run = _E2ERun(sc, server, stt)
    start = counts(server)
    before = set(asyncio.all_tasks())
    try:
        session, audio, engaged = await _start_engaged(run, trigger or sc.trigger)
        owned = objects_of(session, activities_of(session))
        seen = await _close_and_watch(
            run, session, audio, limit=limit, observe=observe, mute_on_close=mute_on_close
        )
        mcp = await _observe_mcp(run.mcp, owned)
        return _outcome(run, session, seen, start, patched=patched, engaged=engaged, mcp=mcp)
    finally:
        try:
            await _cleanup(before, run)
        finally:
            install.restore()
