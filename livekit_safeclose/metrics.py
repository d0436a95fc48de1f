"""Prometheus metrics of the close, on livekit-agents' own registry and multiprocess setup.

The worker's ``/metrics`` endpoint (``prometheus_port``) serves prometheus_client's default
registry or, in multiprocess mode (``prometheus_multiproc_dir`` / ``PROMETHEUS_MULTIPROC_DIR``),
what every process wrote to that directory. The metrics below are plain prometheus_client
metrics on the default registry, so they appear on that endpoint in both modes with nothing
to configure: in multiprocess mode a job process writes its own file, and the two gauges are
summed over the live processes (``livesum``).

They are fed from two places only: the close report, once per close, when it is published
(:func:`record_close`), and the stream ledger, as a stream opens and as it ends. No value is
computed at scrape time (a scrape in multiprocess mode runs in another process); a healthy
close costs two counter increments and one histogram observation.
"""

from __future__ import annotations

import asyncio
import linecache
import os
import weakref
from collections.abc import Iterable
from typing import Any, Literal

from .report import CloseReport, StuckTask
from .stacks import parked_at

_prom: Any
try:  # a livekit-agents dependency; without it the layer simply has no metrics
    import prometheus_client as _prom
except ImportError:  # pragma: no cover - livekit-agents 1.8 requires it
    _prom = None

Outcome = Literal["clean", "forced", "abandoned"]
StuckKind = Literal[
    "tool", "on_exit", "on_enter", "stt", "tts", "llm", "realtime", "toolset", "start", "other"
]
STUCK_KINDS: tuple[StuckKind, ...] = (
    "tool", "on_exit", "on_enter", "stt", "tts", "llm", "realtime", "toolset", "start", "other",
)  # fmt: skip

#: a close is bounded by ``close_timeout`` (10 s by default); a healthy one takes milliseconds
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0)


class _Metrics:
    """The five metrics, made on first use (not at import: importing the package, as a
    vanilla worker's agent file may, must not add metrics to its ``/metrics``)."""

    def __init__(self, prom: Any) -> None:
        self.closes = prom.Counter(
            "lk_safeclose_closes",
            "Session closes by outcome: clean (no bound hit), forced (a bound was hit, everything "
            "stopped), abandoned (something was left running or open)",
            ["outcome", "reason"],
        )
        self.close_duration = prom.Histogram(
            "lk_safeclose_close_duration_seconds",
            "How long a session close took, from the first close call to its report",
            ["outcome"],
            buckets=DURATION_BUCKETS,
        )
        self.stuck = prom.Counter(
            "lk_safeclose_stuck_tasks",
            "Tasks a close found stuck (had to cancel, or could not stop), by what they were",
            ["kind"],
        )
        self.open_streams = prom.Gauge(
            "lk_safeclose_open_streams",
            "Provider streams (STT, TTS, LLM) open now, from the stream ledger",
            ["kind"],
            multiprocess_mode="livesum",
        )
        self.zombies = prom.Gauge(
            "lk_safeclose_zombie_tasks",
            "Tasks a forced close cancelled that swallowed the cancellation and still run",
            multiprocess_mode="livesum",
        )


_made: _Metrics | None = None


def made() -> _Metrics | None:
    """The metrics, made (registered on prometheus_client's default registry) on first call;
    ``None`` without prometheus_client."""
    global _made
    if _made is None and _prom is not None:
        _made = _Metrics(_prom)
    return _made


#: zombies still running, process-wide (weak: a collected task is no longer one)
_zombies: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def outcome(report: CloseReport) -> Outcome:
    """``abandoned`` when the close left something running or open, ``forced`` when it hit
    a bound but stopped everything, else ``clean``."""
    if report.abandoned or report.streams_left_open:
        return "abandoned"
    return "forced" if report.forced else "clean"


def stuck_kind(stuck: StuckTask) -> StuckKind:
    """What a stuck task was, from its name and where it was parked (the source line is
    read for a toolset close, which parks in a ``gather`` of ``toolset.aclose()`` calls)."""
    name = stuck.name.lower()
    chain = " ".join(stuck.stack).lower()
    if "on_exit" in name:
        return "on_exit"
    if "on_enter" in name:
        return "on_enter"
    if "_update_activity_task" in name or any(line.endswith(" in start") for line in stuck.stack):
        return "start"
    if "tool_exec" in name or "func_exec" in name:
        return "tool"
    if "realtime" in name or "realtime" in chain:
        return "realtime"
    if "_execute_tools_task" in chain:
        return "tool"
    if "toolset" in chain or "/mcp/" in chain or "toolset" in _source_line(parked_at(stuck.stack)):
        return "toolset"
    if "recognizestream" in name or "stt." in name:
        return "stt"
    if "synthesizestream" in name or "chunkedstream" in name or "tts." in name:
        return "tts"
    if "llmstream" in name or "llm." in name:
        return "llm"
    return "other"


def _source_line(where: str) -> str:
    """The source text of a ``file:line in function`` location and the two lines after it
    (a multi-line ``await``), empty when unknown."""
    path, _, rest = where.rpartition(":")
    lineno = rest.split(" ", 1)[0]
    if not path or not lineno.isdigit():
        return ""
    return " ".join(linecache.getline(path, int(lineno) + i) for i in range(3)).lower()


def record_close(report: CloseReport, zombies: Iterable[asyncio.Task[Any]] = ()) -> None:
    """Count one published close: its outcome, duration, stuck tasks and new zombies."""
    m = made()
    if m is None:
        return
    result = outcome(report)
    _child(m.closes, result, report.reason).inc()
    _child(m.close_duration, result).observe(report.duration_ms / 1000)
    if result == "clean":
        return
    for stuck in report.stuck:
        _child(m.stuck, stuck_kind(stuck)).inc()
    for task in zombies:
        if not task.done() and task not in _zombies:
            _zombies.add(task)
            task.add_done_callback(_zombie_ended)
    m.zombies.set(_live_zombies())


def record_clean(reason: str, duration_s: float) -> None:
    """Count one close that forced nothing (what :func:`record_close` counts for it)."""
    m = made()
    if m is not None:
        _child(m.closes, "clean", reason).inc()
        _child(m.close_duration, "clean").observe(duration_s)


#: labelled children already made: ``labels()`` validates and locks on every call
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def _live_zombies() -> int:
    return sum(not t.done() for t in list(_zombies))


def _zombie_ended(_: asyncio.Task[Any]) -> None:
    m = made()
    if m is not None:
        m.zombies.set(_live_zombies())


def zombie_tasks() -> int:
    """Zombies still running in this process (what the gauge reports)."""
    return _live_zombies()


def stream_opened(kind: str) -> None:
    """The stream ledger registered a stream of ``kind``."""
    m = made()
    if m is not None:
        _child(m.open_streams, kind).inc()


def stream_closed(kind: str) -> None:
    """A stream the ledger registered ended."""
    m = made()
    if m is not None:
        _child(m.open_streams, kind).dec()


def forget_process(pid: int) -> None:
    """A job process exited: in multiprocess mode its live gauges no longer count (what it
    counted died with it). prometheus_client keeps a dead process's gauge file until told."""
    if _prom is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
