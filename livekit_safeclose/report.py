"""The close report: what a close did, how long each step took, and what was stuck.

A forced close is only useful in production if someone can see *why* it had to be
forced, so every close records its steps and, for anything that did not settle, the
exact line where it was parked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .stacks import await_chain, parked_at, task_name

logger = logging.getLogger("livekit.agents.safeclose")

#: how a bounded step ended: it finished (``done``), raised (``error``), was cancelled
#: from outside (``cancelled``), hit its bound and was stopped (``timeout``), or hit its
#: bound and was left running (``abandoned``)
StepOutcome = Literal["done", "error", "cancelled", "timeout", "abandoned"]

_MAX_STACK = 8


@dataclass
class StepRecord:
    """One bounded step of a close."""

    name: str
    ms: float
    outcome: StepOutcome
    detail: str = ""


@dataclass
class StuckTask:
    """A task that had not settled when its bound ran out, with where it was parked."""

    name: str
    stack: list[str]
    swallowed_cancel: bool = False


@dataclass
class CloseReport:
    """Everything one session close did. ``forced`` is true when any bound was hit."""

    session: str
    reason: str
    drain_requested: bool
    drain_timeout: float
    close_timeout: float
    started_at: float = field(default_factory=time.time)
    duration_ms: float = 0.0
    forced: bool = False
    escalated: bool = False
    completed: bool = False
    steps: list[StepRecord] = field(default_factory=list)
    stuck: list[StuckTask] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)
    torn_down: list[str] = field(default_factory=list)
    streams_closed_by_force: list[str] = field(default_factory=list)
    streams_left_open: list[str] = field(default_factory=list)
    #: ms since the close began at which each phase of upstream's close began (``drain``,
    #: ``models``, ``steps``, ``after``)
    phases: dict[str, float] = field(default_factory=dict)
    #: ms since the close began at which this graceful close became a forced one, and why
    #: (``"forced close"``: one joined it; ``"graceful_timeout"``: its bound passed)
    escalated_ms: float | None = None
    escalated_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def summary(self) -> str:
        """A short human line, used in test failure messages and the CLI."""
        parts = [
            f"close of {self.session} ({self.reason}) took {self.duration_ms:.0f} ms",
            "forced" if self.forced else "clean",
        ]
        if self.stuck:
            parts.append("stuck: " + "; ".join(f"{s.name} at {parked_at(s.stack)}" for s in self.stuck))
        if self.abandoned:
            parts.append("abandoned: " + ", ".join(self.abandoned))
        if self.streams_left_open:
            parts.append("left open: " + ", ".join(self.streams_left_open))
        return ", ".join(parts)


#: per session, its last close's report, or (a clean close) what builds it when first read
_reports: weakref.WeakKeyDictionary[Any, CloseReport | Callable[[], CloseReport]] = (
    weakref.WeakKeyDictionary()
)


def last_close_report(session: Any) -> CloseReport | None:
    """The report of the most recent close of ``session`` (``None`` before the first)."""
    found = _reports.get(session)
    if found is None or isinstance(found, CloseReport):
        return found
    report = _reports[session] = found()
    return report


def publish_clean(session: Any, build: Callable[[], CloseReport], reason: str, duration_s: float) -> None:
    """A close that forced nothing: its report is built when first read (most never are,
    and building one is a good part of what a healthy close would cost the layer); the
    metrics count it now."""
    _reports[session] = build
    try:
        from . import metrics

        metrics.record_clean(reason, duration_s)
    except Exception:  # telemetry must never break a close
        logger.exception("could not publish the close report")
    logger.debug("session closed cleanly in %.0f ms", duration_s * 1000)


def emit(session: Any, report: CloseReport, zombies: Iterable[asyncio.Task[Any]] = ()) -> None:
    """Store the report and publish it: one structured WARNING when anything was forced,
    the Prometheus metrics, and (forced) the OpenTelemetry span. ``zombies``: the tasks the
    close left running that swallowed its cancellation."""
    _reports[session] = report
    try:
        from . import metrics, tracing

        metrics.record_close(report, zombies)
        tracing.record_close(report)
    except Exception:  # telemetry must never break a close
        logger.exception("could not publish the close report")
    if report.forced or report.abandoned or report.streams_left_open:
        logger.warning(
            "session close was forced: %s",
            report.summary(),
            extra={"safeclose_report": report.to_dict()},
        )
    else:
        logger.debug("session closed cleanly in %.0f ms", report.duration_ms)


def stuck_task(task: asyncio.Task[Any], *, swallowed_cancel: bool = False) -> StuckTask:
    """The report entry for ``task``: its name and where it is parked."""
    return StuckTask(
        name=task_name(task), stack=await_chain(task, _MAX_STACK), swallowed_cancel=swallowed_cancel
    )
