"""Operators see every forced close: Prometheus metrics and an OpenTelemetry span, fed by the
close report; a clean close records a count and a duration only.

The metrics are read from prometheus_client's default registry, the one the worker's
``/metrics`` endpoint serves (``tests/worker/test_worker_metrics.py`` scrapes a real worker);
the span from the SDK's in-memory exporter behind livekit-agents' own tracer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from livekit.agents import telemetry
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

import livekit_safeclose as lsc
from livekit_safeclose import metrics
from livekit_safeclose.report import StuckTask
from livekit_safeclose.testing._runs import close_ended
from livekit_safeclose.testing.fakes import FakeReply
from livekit_safeclose.testing.scenarios import Ctx, ScenarioAgent, make_session, run_scenario
from livekit_safeclose.tracing import SPAN_NAME


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def closes(outcome: str) -> float:
    return sample("lk_safeclose_closes_total", outcome=outcome, reason="user_initiated")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """livekit-agents' tracer exporting to memory for the test (then back to the global)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.set_tracer_provider(provider)
    yield exporter
    telemetry.tracer.set_provider(trace_api.get_tracer_provider())
    provider.shutdown()


def forced_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == SPAN_NAME]


async def _stuck_tool(ctx: Ctx, tool: str) -> Any:
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx, tool=tool))
    session.generate_reply(user_input="look it up")
    await asyncio.wait_for(ctx.engaged.wait(), 5)
    return session


# -- Prometheus --------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_forced_close_is_counted_with_its_stuck_tool_and_duration() -> None:
    before = (closes("forced"), sample("lk_safeclose_stuck_tasks_total", kind="tool"))
    count = sample("lk_safeclose_close_duration_seconds_count", outcome="forced")
    total = sample("lk_safeclose_close_duration_seconds_sum", outcome="forced")
    out = await run_scenario("tool-park-aclose", patched=True, drain_timeout=0.3, close_timeout=2.0)
    assert out.clean and out.report is not None and out.report.forced
    assert closes("forced") == before[0] + 1
    # the speech task parked in the tool and the tool itself
    assert sample("lk_safeclose_stuck_tasks_total", kind="tool") >= before[1] + 2
    assert sample("lk_safeclose_close_duration_seconds_count", outcome="forced") == count + 1
    took = sample("lk_safeclose_close_duration_seconds_sum", outcome="forced") - total
    assert took == pytest.approx(out.report.duration_ms / 1000, abs=1e-3) and 0.3 <= took <= 2.0


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_clean_close_is_counted_and_nothing_else() -> None:
    stuck = {k: sample("lk_safeclose_stuck_tasks_total", kind=k) for k in metrics.STUCK_KINDS}
    clean, forced = closes("clean"), closes("forced")
    out = await run_scenario("healthy-aclose", patched=True)
    assert out.clean and out.report is not None and not out.report.forced
    assert closes("clean") == clean + 1 and closes("forced") == forced
    assert {k: sample("lk_safeclose_stuck_tasks_total", kind=k) for k in metrics.STUCK_KINDS} == stuck


@pytest.mark.vanilla
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_vanilla_forced_close_leaves_no_trace_in_the_metrics() -> None:
    """The bug this fixes for operators: on vanilla a hung close is never counted."""
    counted = sum(closes(o) for o in ("clean", "forced", "abandoned"))
    out = await run_scenario("tool-park-aclose", patched=False, limit=1.0)
    assert not out.closed
    assert sum(closes(o) for o in ("clean", "forced", "abandoned")) == counted


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_abandoned_close_is_counted_as_abandoned() -> None:
    """A toolset whose close never returns: upstream's close is abandoned."""
    abandoned = closes("abandoned")
    out = await run_scenario("session-toolset-aclose-hang-aclose", patched=True, close_timeout=2.0)
    assert out.report is not None and out.report.abandoned
    assert closes("abandoned") == abandoned + 1


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_open_streams_gauge_follows_the_ledger() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    base = {k: sample("lk_safeclose_open_streams", kind=k) for k in ("stt", "tts", "llm")}
    ctx = Ctx()
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx))
    for _ in range(100):  # the STT stream opens once the recognition pump runs
        if lsc.open_streams()["stt"]:
            break
        await asyncio.sleep(0.02)
    assert lsc.open_streams(session)["stt"] == 1
    assert sample("lk_safeclose_open_streams", kind="stt") == base["stt"] + 1
    await session.aclose()
    await asyncio.sleep(0.05)  # the ledger hears of a stream's end from its task's callback
    assert {k: sample("lk_safeclose_open_streams", kind=k) for k in base} == base


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_zombie_gauge_counts_a_swallowing_tool_until_it_ends() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    base = sample("lk_safeclose_zombie_tasks")
    ctx = Ctx()
    session = await _stuck_tool(ctx, "swallow")
    await session.aclose()
    await close_ended(session)
    report = lsc.last_close_report(session)
    assert report is not None and any(s.swallowed_cancel for s in report.stuck), report.summary()
    assert sample("lk_safeclose_zombie_tasks") >= base + 1
    assert metrics.zombie_tasks() >= 1
    ctx.ledger.release()  # the tool stops swallowing and ends
    for _ in range(50):
        if sample("lk_safeclose_zombie_tasks") == base:
            break
        await asyncio.sleep(0.02)
    assert sample("lk_safeclose_zombie_tasks") == base


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("scenario", "kind"),
    [
        ("tool-park-aclose", "tool"),
        ("on-exit-hang-aclose", "on_exit"),
        ("on-enter-hang-aclose", "on_enter"),
        ("stt-close-hang-aclose", "stt"),
        ("tts-stall-aclose", "tts"),
        ("llm-stall-aclose", "llm"),
        ("session-toolset-aclose-hang-aclose", "toolset"),
        ("agent-toolset-aclose-hang-aclose", "toolset"),
        ("start-toolset-setup-hang-aclose", "start"),
    ],
)
async def test_stuck_tasks_are_classified_by_what_hung(scenario: str, kind: str) -> None:
    out = await run_scenario(scenario, patched=True, close_timeout=2.0)
    assert out.report is not None
    kinds = [metrics.stuck_kind(s) for s in out.report.stuck]
    assert kind in kinds, [(s.name, s.stack[-1:]) for s in out.report.stuck]


def test_stuck_kind_of_a_realtime_session_and_of_anything_else() -> None:
    rt = StuckTask(name="RealtimeSession._main_task", stack=["/x/realtime_model.py:10 in _main_task"])
    assert metrics.stuck_kind(rt) == "realtime"
    assert metrics.stuck_kind(StuckTask(name="Task-7 (helper)", stack=["/app/x.py:3 in helper"])) == "other"
    assert metrics.stuck_kind(StuckTask(name="Task-8", stack=[])) == "other"


# -- OpenTelemetry -------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_forced_close_records_a_span_carrying_its_report(spans: InMemorySpanExporter) -> None:
    out = await run_scenario("tool-park-aclose", patched=True, drain_timeout=0.3, close_timeout=2.0)
    report = out.report
    assert report is not None and report.forced
    (span,) = forced_spans(spans)
    attrs = dict(span.attributes or {})
    assert attrs["lk.safeclose.reason"] == "user_initiated"
    assert attrs["lk.safeclose.forced"] is True and attrs["lk.safeclose.outcome"] == "forced"
    assert attrs["lk.safeclose.duration_ms"] == report.duration_ms
    assert attrs["lk.safeclose.stuck_tasks"] == len(report.stuck) >= 2
    assert span.start_time is not None and span.end_time is not None
    assert (span.end_time - span.start_time) / 1e6 == pytest.approx(report.duration_ms, abs=0.01)
    events: dict[str, list[dict[str, Any]]] = {}
    for ev in span.events:
        events.setdefault(ev.name, []).append(dict(ev.attributes or {}))
    assert [e["lk.safeclose.phase"] for e in events["phase"]] == list(report.phases)
    steps = {e["lk.safeclose.step"]: e for e in events["step"]}
    assert steps["activity.drain"]["lk.safeclose.outcome"] == "timeout"
    assert {e["lk.safeclose.step"] for e in events["step"]} == {s.name for s in report.steps}
    tool = next(e for e in events["stuck_task"] if e["lk.safeclose.task"].startswith("tool_exec_lookup"))
    assert tool["lk.safeclose.kind"] == "tool"
    assert tool["lk.safeclose.parked_at"].endswith(" in park"), tool
    assert len(tool["lk.safeclose.stack"]) >= 2


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_clean_close_records_no_span(spans: InMemorySpanExporter) -> None:
    out = await run_scenario("healthy-aclose", patched=True)
    assert out.clean
    assert forced_spans(spans) == []
    assert any(s.name == "session_close" for s in spans.get_finished_spans())  # upstream's own


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_failing_exporter_never_breaks_the_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("exporter down")

    monkeypatch.setattr("livekit_safeclose.tracing.record_close", broken)
    with caplog.at_level(logging.ERROR, logger="livekit.agents.safeclose"):
        out = await run_scenario("tool-park-aclose", patched=True, drain_timeout=0.3, close_timeout=2.0)
    assert out.clean and out.report is not None and out.report.forced
    assert "could not publish the close report" in caplog.text
