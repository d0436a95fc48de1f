"""OpenTelemetry: every forced close records one span that carries its report.

The span goes through livekit-agents' own tracer (``livekit.agents.telemetry.tracer``), so it
reaches whatever provider the agent configured with ``telemetry.set_tracer_provider()`` (and
LiveKit Cloud's exporter), next to the session's own spans; its parent is the context the
close was started in. It spans the close (from its first call to its report) and carries the
report: attributes for the close as a whole, one event per phase (at the time it began),
per bounded step (its duration and outcome) and per stuck task (what it was and where it was
parked). A clean close records nothing.
"""

from __future__ import annotations

from typing import Any

from .metrics import outcome, stuck_kind
from .report import CloseReport
from .stacks import parked_at

SPAN_NAME = "safeclose.forced_close"
PREFIX = "lk.safeclose."


def _tracer() -> Any:
    try:
        from livekit.agents.telemetry import tracer
    except ImportError:
        return None
    return tracer


def close_attributes(report: CloseReport) -> dict[str, Any]:
    """The span's attributes: the report's scalars and its name lists."""
    attrs: dict[str, Any] = {
        "session": report.session,
        "reason": report.reason,
        "outcome": outcome(report),
        "forced": report.forced,
        "completed": report.completed,
        "escalated": report.escalated,
        "drain_requested": report.drain_requested,
        "drain_timeout_s": report.drain_timeout,
        "close_timeout_s": report.close_timeout,
        "duration_ms": report.duration_ms,
        "stuck_tasks": len(report.stuck),
        "cancelled": report.cancelled,
        "abandoned": report.abandoned,
        "streams_closed_by_force": report.streams_closed_by_force,
        "streams_left_open": report.streams_left_open,
    }
    if report.escalated_by is not None:
        attrs["escalated_by"] = report.escalated_by
        attrs["escalated_ms"] = report.escalated_ms
    # an empty list is a valid attribute, but says nothing: left out
    return {PREFIX + k: v for k, v in attrs.items() if v != []}


def record_close(report: CloseReport) -> None:
    """Record the span of a forced close (nothing for a clean one)."""
    if outcome(report) == "clean":
        return
    tracer = _tracer()
    if tracer is None:
        return
    start = int(report.started_at * 1e9)
    end = start + int(report.duration_ms * 1e6)
    span = tracer.start_span(SPAN_NAME, start_time=start, attributes=close_attributes(report))
    for phase, ms in report.phases.items():
        span.add_event("phase", {PREFIX + "phase": phase}, timestamp=start + int(ms * 1e6))
    for step in report.steps:
        attrs = {PREFIX + "step": step.name, PREFIX + "ms": step.ms, PREFIX + "outcome": step.outcome}
        if step.detail:
            attrs[PREFIX + "detail"] = step.detail
        span.add_event("step", attrs, timestamp=end)
    for stuck in report.stuck:
        span.add_event(
            "stuck_task",
            timestamp=end,
            attributes={
                PREFIX + "task": stuck.name,
                PREFIX + "kind": stuck_kind(stuck),
                PREFIX + "parked_at": parked_at(stuck.stack),
                PREFIX + "stack": stuck.stack,
                PREFIX + "swallowed_cancel": stuck.swallowed_cancel,
            },
        )
    span.end(end_time=end)
