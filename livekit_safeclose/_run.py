"""One close in flight: its options, its deadlines and its report.

Every wait of a close is measured against the same two deadlines (the drain bound and the
close bound), so the bounds of successive steps never add up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import streams as streams_mod
from .report import CloseReport, StepRecord, logger, stuck_task, task_name

T = TypeVar("T")

# time kept back at the end of the close bound for the final stream sweep
SWEEP_RESERVE = 0.25
# time kept between the last teardown step and the end of upstream's close, so that the
# close event is always emitted before the close bound
EMIT_RESERVE = 0.15
# after force-cancelling, how long a task may take to unwind before it counts as a zombie
UNWIND_GRACE = 0.5
# room kept for the models' teardown after the drain, beyond the final-transcript wait
TEARDOWN_RESERVE = 0.5
# how long closing the models may take (beyond the final-transcript wait) before the
# session's streams are stopped from outside
MODEL_CLOSE_ALLOWANCE = 1.0
# any other teardown step (toolsets, recorder, IVR, forwarding tasks) gets this long
# before it is abandoned: a hung MCP server must not eat the whole close bound
STEP_ALLOWANCE = 1.0


def _check_timeout(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


_warned: set[tuple[float, float, float]] = set()


def _warn_tight(o: Options, transcript_timeout: float) -> None:
    key = (o.drain_timeout, o.close_timeout, transcript_timeout)
    if key in _warned:
        return
    _warned.add(key)
    need = o.drain_timeout + transcript_timeout + TEARDOWN_RESERVE + SWEEP_RESERVE + EMIT_RESERVE
    logger.warning(
        "close_timeout=%.2fs cannot hold drain_timeout=%.2fs plus the final-transcript wait "
        "(session_close_transcript_timeout=%.2fs); the drain bound is shortened. "
        "Use close_timeout >= %.2fs to keep both.",
        o.close_timeout,
        o.drain_timeout,
        transcript_timeout,
        need,
    )


@dataclass(frozen=True)
class Options:
    """The two bounds of a forced close, validated once."""

    drain_timeout: float = 5.0
    close_timeout: float = 10.0
    close_models: bool = False

    @classmethod
    def validated(
        cls, drain_timeout: object = 5.0, close_timeout: object = 10.0, close_models: object = False
    ) -> Options:
        d = _check_timeout("drain_timeout", drain_timeout)
        c = _check_timeout("close_timeout", close_timeout)
        if d > c:
            raise ValueError(f"drain_timeout ({d}) must be <= close_timeout ({c})")
        if not isinstance(close_models, bool):
            raise TypeError(f"close_models must be a bool, not {type(close_models).__name__}")
        return cls(d, c, close_models)


class CloseRun:
    """State of one session close, shared by every caller that joins it."""

    def __init__(
        self,
        *,
        session_label: str,
        options: Options,
        reason: str,
        drain: bool,
        transcript_timeout: float,
    ) -> None:
        self.options = options
        self.graceful = drain
        self.transcript_timeout = transcript_timeout
        self.t0 = time.monotonic()
        self.report = CloseReport(
            session=session_label,
            reason=reason,
            drain_requested=drain,
            drain_timeout=options.drain_timeout,
            close_timeout=options.close_timeout,
        )
        # replaced (and the old one set) whenever a deadline moves: every waiter holds
        # the event it started with, so one waking waiter cannot hide it from another
        self._changed = asyncio.Event()
        # tasks that await the close itself (a tool calling aclose()): never waited for
        self.waiters: set[asyncio.Task[Any]] = set()
        self.task: asyncio.Task[None] | None = None
        # steps that hit their bound: left running (they may still finish once the
        # streams are stopped), cancelled only when the close bound ends
        self.pending: list[asyncio.Future[Any]] = []
        # set when an abandoned drain() still holds the activity lock
        self.lock_abandoned = False
        # every activity this close touched: what a post-close audit looks for
        self.activities: list[Any] = []
        # tasks cancelled by this close that did not end: never waited for again
        self.zombies: set[asyncio.Task[Any]] = set()
        # tasks the lock-free force-cancel cancelled
        self.forced_tasks: list[asyncio.Task[Any]] = []
        self.drain_deadline = math.inf
        self.close_deadline = math.inf
        if not drain:
            self._start_clock(self.t0)

    # -- deadlines -------------------------------------------------------------------
    def drain_budget(self) -> float:
        """The drain bound, shrunk so the final-transcript wait still fits in the close
        bound: that wait belongs to a healthy close and is never cut. A floor of a tenth
        of the close bound keeps an idle activity from being forced for nothing when
        ``close_timeout`` was set too tight to hold both (warned once)."""
        o = self.options
        room = o.close_timeout - self.transcript_timeout - TEARDOWN_RESERVE - SWEEP_RESERVE - EMIT_RESERVE
        if room < o.drain_timeout:
            _warn_tight(o, self.transcript_timeout)
        return max(min(o.drain_timeout, 0.1 * o.close_timeout), min(o.drain_timeout, room))

    def _start_clock(self, now: float) -> None:
        self.drain_deadline = now + self.drain_budget()
        self.close_deadline = now + self.options.close_timeout

    def escalate(self) -> None:
        """A forced close joined a graceful one: from now on the bounds apply."""
        if not self.graceful:
            return
        self.graceful = False
        self.report.escalated = True
        now = time.monotonic()
        self.drain_deadline = min(self.drain_deadline, now + self.drain_budget())
        self.close_deadline = min(self.close_deadline, now + self.options.close_timeout)
        self._notify()

    def graceful_drain_done(self) -> None:
        """The graceful drain ended: the teardown after it is bounded like any other."""
        if math.isinf(self.close_deadline):
            now = time.monotonic()
            self.close_deadline = now + self.options.close_timeout
            self.drain_deadline = now
            self._notify()

    def _notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def steps_deadline(self) -> float:
        """Where every teardown step must have ended."""
        return self.close_deadline - SWEEP_RESERVE - EMIT_RESERVE

    def inner_deadline(self) -> float:
        """Where upstream's close itself (teardown, close event, room io) must have ended."""
        return self.close_deadline - SWEEP_RESERVE

    @staticmethod
    def left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    # -- waiting -----------------------------------------------------------------------
    async def wait(self, task: asyncio.Future[Any], deadline: float) -> bool:
        """Wait for ``task`` until ``deadline`` (monotonic). Never cancels it, never hangs
        on a task that swallows cancellation. True when it finished."""
        if task.done():
            return True
        if math.isinf(deadline):
            await asyncio.wait({task})
            return True
        await asyncio.wait({task}, timeout=self.left(deadline))
        return task.done()

    async def wait_phase(self, fut: asyncio.Future[Any], phase: str) -> bool:
        """Wait for ``fut`` under the bound of ``phase`` (``"drain"`` or ``"close"``).

        A graceful drain waits without a bound, but wakes when a forced close escalates
        it, so the bound applies from then on. True when ``fut`` finished."""
        while not fut.done():
            changed = self._changed
            if phase == "drain":
                deadline = math.inf if self.graceful else self.drain_deadline
            elif phase == "inner":
                deadline = self.inner_deadline()
            else:
                deadline = self.steps_deadline()
            waiter = asyncio.ensure_future(changed.wait())
            try:
                timeout = None if math.isinf(deadline) else self.left(deadline)
                await asyncio.wait({fut, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if fut.done():
                return True
            if not changed.is_set():
                return False
        return True

    async def step(
        self,
        name: str,
        aw: Awaitable[T],
        *,
        deadline: float | None = None,
    ) -> T | None:
        """Run one teardown step bounded by ``deadline`` (default: the close bound).

        On timeout the step is cancelled once and abandoned, not awaited: a step that
        swallows cancellation must not hold the whole close."""
        start = time.monotonic()
        if deadline is None:
            deadline = min(self.steps_deadline(), start + STEP_ALLOWANCE)
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        finished = await self.wait(task, deadline)
        ms = (time.monotonic() - start) * 1000
        if not finished:
            if isinstance(task, asyncio.Task):
                self.report.stuck.append(stuck_task(task))
            self.pending.append(task)
            self.report.abandoned.append(name)
            self.report.forced = True
            self.record(name, ms, "abandoned")
            return None
        if task.cancelled():
            self.record(name, ms, "done", "cancelled")
            return None
        exc = task.exception()
        if exc is not None:
            self.record(name, ms, "error", f"{type(exc).__name__}: {exc}")
            return None
        self.record(name, ms, "done")
        self.report.torn_down.append(name)
        return task.result()

    def record(self, name: str, ms: float, outcome: Any, detail: str = "") -> None:
        self.report.steps.append(StepRecord(name=name, ms=round(ms, 1), outcome=outcome, detail=detail))

    async def cancel_and_settle(self, name: str, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel ``tasks`` and give them the unwind grace to end. Tasks that already
        proved they swallow cancellation are not waited for again; the ones that do not end
        now join them and are reported with where they are parked."""
        live = [t for t in tasks if not t.done() and t not in self.zombies and t not in self.waiters]
        if not live:
            return
        start = time.monotonic()
        for t in live:
            t.cancel()
        self.note_cancelled(live)
        await asyncio.wait(live, timeout=self.left(min(self.steps_deadline(), start + UNWIND_GRACE)))
        stuck = [t for t in live if not t.done()]
        self.mark_zombies(stuck)
        outcome = "timeout" if stuck else "done"
        self.record(
            name, (time.monotonic() - start) * 1000, outcome, f"{len(stuck)} did not end" if stuck else ""
        )

    def mark_zombies(self, tasks: list[asyncio.Task[Any]]) -> None:
        for t in tasks:
            if t not in self.zombies:
                self.zombies.add(t)
                entry = stuck_task(t)
                entry.swallowed_cancel = True
                self.report.stuck.append(entry)
                self.report.forced = True

    async def sweep_streams(self, session: Any, deadline: float) -> None:
        """Stop the session's provider streams that are still open: cancel each stream's
        main task (again) and wait until ``deadline``. A stream whose close waits for a
        provider goodbye ends here; one that swallows every cancellation is reported."""
        leftover = [e for e in streams_mod.streams_of(session) if not e.task.done()]
        if not leftover:
            return
        self.report.forced = True
        start = time.monotonic()
        for e in leftover:
            self.report.stuck.append(stuck_task(e.task))
            e.task.cancel()
        await asyncio.wait({e.task for e in leftover}, timeout=self.left(deadline))
        closed = [e for e in leftover if e.task.done()]
        self.report.streams_closed_by_force.extend(e.label for e in closed)
        self.record(
            "streams.sweep",
            (time.monotonic() - start) * 1000,
            "done" if len(closed) == len(leftover) else "timeout",
            f"{len(closed)}/{len(leftover)} stopped",
        )

    def streams_left_open(self, session: Any) -> None:
        for e in streams_mod.streams_of(session):
            if not e.task.done():
                self.report.streams_left_open.append(e.label)
                self.report.stuck.append(stuck_task(e.task))

    def note_cancelled(self, tasks: list[asyncio.Task[Any]]) -> None:
        self.report.cancelled.extend(task_name(t) for t in tasks)
