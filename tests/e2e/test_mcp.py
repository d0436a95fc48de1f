"""MCP servers for real (livekit/agents#5212): the real ``MCPServerStdio`` / ``MCPServerHTTP``
against real MCP stand-ins written with the ``mcp`` SDK (a stdio subprocess, a
streamable-HTTP server on 127.0.0.1), on a real session with the real plugins.

Per transport: a tool call that never answers, closed by ``aclose()`` and by
``shutdown(drain=False)`` (and with the toolset on the session), and a healthy session whose
server ignores its shutdown. With the layer, after the close: the stdio child has exited,
the HTTP server holds no connection, no MCP client task runs, and the loop had no wake-up
attributable to the session in 2 s. On vanilla, the close is still hanging after a bounded
wait, with the server alive or its connection open (so each test bites).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT, MARGIN, VANILLA_WAIT

from livekit_safeclose.testing._runs import cancel_since
from livekit_safeclose.testing.e2e import E2E_SCENARIOS, E2EOutcome, run_e2e_scenario
from livekit_safeclose.testing.loop_quiet import mcp_tasks
from livekit_safeclose.testing.mcp import HANG_TOOL, MCPStandin, MCPTransport
from livekit_safeclose.testing.standins import ProviderServer

pytest.importorskip("mcp")

#: time the server side gets to see a connection the client just dropped
SERVER_GRACE = 0.05

MCP = [s.id for s in E2E_SCENARIOS.values() if s.mcp is not None]
HANGS = [s.id for s in E2E_SCENARIOS.values() if s.mcp is not None and s.engaged == "mcp_call"]


async def _run(name: str, srv: ProviderServer, *, patched: bool, limit: float | None = None) -> E2EOutcome:
    return await run_e2e_scenario(
        name,
        patched=patched,
        server=srv,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        limit=limit if limit is not None else (CLOSE_TIMEOUT + MARGIN if patched else VANILLA_WAIT),
        observe=0.2,
    )


@pytest.mark.timeout(90)
@pytest.mark.asyncio
@pytest.mark.parametrize("name", MCP)
async def test_layer_closes_and_the_mcp_server_is_gone(srv: ProviderServer, name: str) -> None:
    sc = E2E_SCENARIOS[name]
    out = await _run(name, srv, patched=True)
    m = out.mcp
    assert m is not None and out.engaged and not out.error, out.summary()
    assert m.calls == (1 if name in HANGS else 0), out.summary()
    assert out.closed and out.ms <= (CLOSE_TIMEOUT + MARGIN) * 1000, out.summary()
    assert out.close_events == 1, out.summary()
    # the server's side: the child exited / no connection; and nothing left in the loop
    assert not m.child_alive and m.http_open == 0, out.summary()
    assert m.tasks == 0, out.summary()
    assert m.attributable == 0, out.summary()
    report = out.report
    assert report is not None, out.summary()
    server = "MCPServerStdio" if sc.mcp == "stdio" else "MCPServerHTTP"
    (step,) = [s for s in report.steps if s.name == f"mcp.{server}.aclose"]
    if sc.mcp_stubborn:
        # the SDK's own sequence could not finish in the bound: the layer ended it
        assert step.outcome == "timeout", report.steps
        assert ("killed" if sc.mcp == "stdio" else "HTTP client closed") in step.detail, report.steps
    else:
        assert step.outcome == "done", report.steps
        # the call was cancelled (the toolset's executor too), so the server closed cleanly
        assert f"cancelled {HANG_TOOL}" in m.events, out.summary()


@pytest.mark.vanilla
@pytest.mark.timeout(90)
@pytest.mark.asyncio
@pytest.mark.parametrize("name", MCP)
async def test_vanilla_hangs_with_the_mcp_server_alive(srv: ProviderServer, name: str) -> None:
    sc = E2E_SCENARIOS[name]
    out = await _run(name, srv, patched=False)
    m = out.mcp
    assert m is not None and out.engaged and not out.error, out.summary()
    assert not out.closed and out.close_events == 0, out.summary()
    if sc.mcp == "stdio":
        assert m.child_alive, out.summary()
    else:
        assert m.http_open >= 1, out.summary()
    assert m.tasks >= 1, out.summary()
    if not (sc.mcp == "http" and sc.mcp_stubborn):
        # the counter bites: a hung session keeps the loop busy (its audio forwarding, or the
        # SDK polling a stubborn child every 10 ms); only the unanswered DELETE parks quietly
        assert m.attributable > 0, out.summary()
    if name in HANGS:
        # the call stays with the server: the toolset's executor was never cancelled
        assert f"cancelled {HANG_TOOL}" not in m.events, out.summary()


@pytest.mark.vanilla
@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_vanilla_stubborn_stdio_server_outlives_the_close_bound(srv: ProviderServer) -> None:
    """What the layer must not regress: vanilla's healthy close does end a stubborn stdio
    server, through the SDK's whole sequence (stdin closed, 2 s, SIGTERM, 2 s, SIGKILL): far
    past any close bound, with the loop polling the child every 10 ms meanwhile."""
    t0 = time.monotonic()
    out = await _run("mcp-stdio-stubborn", srv, patched=False, limit=8.0)
    m = out.mcp
    assert m is not None and out.closed, out.summary()
    assert out.ms >= 3500, out.summary()
    assert not m.child_alive and "sigterm" in m.events, out.summary()
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_mcp_server_aclose_outside_a_session_close_is_upstreams() -> None:
    """The wrapper acts only while the server's session closes: a direct ``aclose()`` runs
    upstream's body unchanged (here: the SDK's own shutdown ends a healthy child)."""
    import livekit_safeclose as lsc

    lsc.install(worker=False, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
    standin = MCPStandin("stdio").start()
    try:
        server = standin.server()
        assert hasattr(type(server).aclose, "__wrapped__")
        await server.initialize()
        pid = standin.stdio.wait_pid() if standin.stdio is not None else None
        assert pid is not None and standin.child_alive()
        await asyncio.wait_for(server.aclose(), 10)
        assert not standin.child_alive() and server._client_task is None
    finally:
        standin.stop()


async def _close_with_a_zombie_stt(
    transport: MCPTransport, *, patched: bool
) -> tuple[bool, float, MCPStandin, set[asyncio.Task[Any]]]:
    """A session whose STT stream swallows every cancellation (an in-memory fault): the
    activity's teardown is abandoned before it reaches the agent's toolsets, so only the
    layer's finisher can shut the (stubborn) MCP server down. Returns (closed, ms, standin,
    the tasks that ran before)."""
    from livekit.agents import Agent, AgentSession

    import livekit_safeclose as lsc
    from livekit_safeclose.testing.fakes import (
        FakeLLM,
        FakeSTT,
        FakeTTS,
        FastAudioOutput,
        ProviderLedger,
        SilenceInput,
    )
    from livekit_safeclose.testing.scenarios import load_vad

    if patched:
        lsc.install(worker=False, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
    ledger = ProviderLedger()
    standin = MCPStandin(transport, stubborn=True).start()
    session: AgentSession[None] = AgentSession(
        stt=FakeSTT(ledger, close_fault="swallow"), llm=FakeLLM(ledger), tts=FakeTTS(ledger),
        vad=load_vad(), session_close_transcript_timeout=0.3,
    )  # fmt: skip
    session.input.audio = SilenceInput()
    session.output.audio = FastAudioOutput()
    before = set(asyncio.all_tasks())
    await session.start(Agent(instructions="test", tools=[standin.toolset()]))
    await asyncio.sleep(0.3)  # the STT stream is open
    t0 = time.monotonic()
    closer = asyncio.ensure_future(session.aclose())
    done, _ = await asyncio.wait({closer}, timeout=CLOSE_TIMEOUT + MARGIN if patched else VANILLA_WAIT)
    ms = (time.monotonic() - t0) * 1000
    await asyncio.sleep(SERVER_GRACE)
    ledger.release()
    return bool(done), ms, standin, before


@pytest.mark.timeout(60)
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["stdio", "http"])
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_a_server_the_teardown_never_reaches_is_shut_down_by_the_finisher(
    transport: MCPTransport, patched: bool
) -> None:
    closed, ms, standin, before = await _close_with_a_zombie_stt(transport, patched=patched)
    try:
        alive, conns, tasks = standin.child_alive(), standin.open_connections(), mcp_tasks()
        if patched:
            assert closed and ms <= (CLOSE_TIMEOUT + MARGIN) * 1000, ms
            assert not alive and conns == 0 and not tasks, (alive, conns, tasks, standin.events())
        else:
            assert not closed
            assert (alive if transport == "stdio" else conns >= 1) and tasks, (alive, conns, tasks)
    finally:
        if standin.stdio is not None:
            standin.stdio.kill()
        await cancel_since(before)
        await asyncio.to_thread(standin.stop)
