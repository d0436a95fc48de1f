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
from dataclasses import asdict, dataclass, field
from types import CoroutineType, FrameType, GeneratorType
from typing import Any, Literal

logger = logging.getLogger("livekit.agents.safeclose")

StepOutcome = Literal["done", "error", "timeout", "abandoned", "skipped"]

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


_reports: weakref.WeakKeyDictionary[Any, CloseReport] = weakref.WeakKeyDictionary()


def last_close_report(session: Any) -> CloseReport | None:
    """The report of the most recent close of ``session`` (``None`` before the first)."""
    return _reports.get(session)


def _store(session: Any, report: CloseReport) -> None:
    _reports[session] = report


def emit(session: Any, report: CloseReport) -> None:
    """Store the report and log it: one structured WARNING when anything was forced."""
    _store(session, report)
    if report.forced or report.abandoned or report.streams_left_open:
        logger.warning(
            "session close was forced: %s",
            report.summary(),
            extra={"safeclose_report": report.to_dict()},
        )
    else:
        logger.debug("session closed cleanly in %.0f ms", report.duration_ms)


def _frame_line(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


def _coro_frames(obj: Any, out: list[str]) -> None:
    """Frames of one task's coroutine chain, outermost first."""
    for _ in range(64):
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None and isinstance(obj, GeneratorType):
            frame = obj.gi_frame
        if frame is not None:
            out.append(_frame_line(frame))
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None)
        if nxt is None and isinstance(obj, GeneratorType):
            nxt = obj.gi_yieldfrom
        if nxt is None or (
            not isinstance(nxt, (CoroutineType, GeneratorType)) and not hasattr(nxt, "ag_frame")
        ):
            return
        obj = nxt


def await_chain(task: asyncio.Task[Any], limit: int = _MAX_STACK) -> list[str]:
    """Where ``task`` is parked, outermost first, following the ``await`` chain into the
    tasks it awaits.

    ``Task.get_stack()`` stops at the outermost coroutine frame; the line that matters
    (the tool's ``await``) is usually several awaits, and often a task, deeper.
    """
    lines: list[str] = []
    current: Any = task
    for _ in range(8):
        _coro_frames(current.get_coro(), lines)
        waiter = getattr(current, "_fut_waiter", None)
        if not isinstance(waiter, asyncio.Task) or waiter.done():
            break
        current = waiter
    # the innermost frames say where it is parked: keep those when trimming
    return lines[-limit:]


def parked_at(stack: list[str]) -> str:
    """The innermost frame outside asyncio itself: the line a reader should look at."""
    for line in reversed(stack):
        if "/asyncio/" not in line:
            return line
    return stack[-1] if stack else "?"


def task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    qual = getattr(coro, "__qualname__", "") or ""
    name = task.get_name()
    return f"{name} ({qual})" if qual and qual not in name else name


def stuck_task(task: asyncio.Task[Any]) -> StuckTask:
    return StuckTask(name=task_name(task), stack=await_chain(task))
