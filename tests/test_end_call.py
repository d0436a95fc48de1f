"""Upstream's EndCallTool whose goodbye never finishes (the caller hung up: a dead audio sink),
on a real AgentSession inside upstream's fake job context.

Vanilla: the tool waits for the goodbye's playout before ``session.shutdown()``: the session
never closes and the job is never shut down. With the layer the goodbye gets
``graceful_timeout``, the close is forced (bounded by ``close_timeout``), the close event
comes once, and the tool's close handler shuts the job down.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from livekit.agents import Agent
from livekit.agents.beta.tools import EndCallTool
from livekit.agents.testing import fake_job_context

import livekit_safeclose as lsc
from livekit_safeclose.testing._runs import LayerForRun, cancel_since, tasks_since
from livekit_safeclose.testing.fakes import FakeReply
from livekit_safeclose.testing.scenarios.agents import Ctx
from livekit_safeclose.testing.scenarios.runner import make_session

GRACEFUL, CLOSE = 1.0, 2.0


async def _end_call(patched: bool, wait: float) -> dict[str, Any]:
    layer = LayerForRun(patched, drain_timeout=0.5, close_timeout=CLOSE, graceful_timeout=GRACEFUL)
    before = set(asyncio.all_tasks())
    ctx = Ctx()
    ctx.dead_sink = True
    ctx.script = [FakeReply(text="Goodbye, thanks for calling.", tool_calls=[("end_call", {})])]
    called = asyncio.Event()
    shutdowns: list[tuple[float, str]] = []
    closes: list[tuple[float, Any]] = []

    async def _on_called(_: Any) -> None:
        called.set()

    try:
        with fake_job_context() as job:
            job._on_shutdown = lambda reason: shutdowns.append((time.monotonic(), reason))
            session = make_session(ctx)
            session.on("close", lambda ev: closes.append((time.monotonic(), ev)))
            tool = EndCallTool(delete_room=False, on_tool_called=_on_called)
            await session.start(Agent(instructions="test", tools=[tool]))
            session.generate_reply(user_input="that's all, bye")
            await asyncio.wait_for(called.wait(), 5)
            t0 = time.monotonic()
            deadline = t0 + wait
            while time.monotonic() < deadline and not (closes and shutdowns):
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # the layer's close ends a moment after its event
            return {
                "closed_after": closes[0][0] - t0 if closes else None,
                "close_events": len(closes),
                "shutdown_after": shutdowns[0][0] - t0 if shutdowns else None,
                "shutdown_reason": shutdowns[0][1] if shutdowns else None,
                "provider_open": ctx.ledger.open_count(),
                "tasks_left": len(tasks_since(before)),
                "report": lsc.last_close_report(session) if patched else None,
            }
    finally:
        ctx.ledger.release()
        await cancel_since(before)
        layer.restore()


@pytest.mark.vanilla
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_vanilla_end_call_into_dead_sink_never_closes() -> None:
    out = await _end_call(False, wait=1.0)
    assert out["closed_after"] is None and out["shutdown_after"] is None, out
    assert out["provider_open"] > 0, out  # the STT stream is still open


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_layer_end_call_into_dead_sink_closes_and_shuts_the_job_down() -> None:
    out = await _end_call(True, wait=GRACEFUL + CLOSE + 2.0)
    report = out["report"]
    assert out["closed_after"] is not None and out["closed_after"] <= GRACEFUL + CLOSE + 0.3, out
    assert out["close_events"] == 1, out
    assert out["shutdown_after"] is not None and out["shutdown_after"] >= out["closed_after"], out
    assert out["shutdown_reason"] == "user_initiated", out
    assert out["provider_open"] == 0 and out["tasks_left"] == 0, out
    assert report is not None and report.forced, out
