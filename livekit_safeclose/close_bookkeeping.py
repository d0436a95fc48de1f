"""What one close did: its steps, the tasks it found stuck, cancelled, abandoned or left
as zombies, and the streams it stopped or left open.

Kept apart from the bounds (:mod:`.bounded_close`) because nothing here decides when to
wait: every bookkeeping method is synchronous, so it can run inside a cancellation path or a
done-callback (the stream sweep, the one coroutine, waits only until the deadline it is
given). The :class:`~.report.CloseReport` is built from this state when first read, and
never read back to decide anything.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from . import streams as streams_mod
from .options import Options
from .report import CloseReport, StepOutcome, StepRecord, StuckTask, logger, stuck_task
from .stacks import awaited_tasks, swallowed_cancel, task_name

T = TypeVar("T")

#: the share of a sweep's time a stream gets to unwind from its first cancellation
SWEEP_SLICE = 0.2

#: a step as recorded: name, started, ended (monotonic), outcome, detail
RawStep = tuple[str, float, float, StepOutcome, str]


class Held(Generic[T]):
    """Objects a close works with: held strongly while the close runs and weakly once it
    ended (:meth:`release`), so a finished close, kept on the session for its report, pins
    nothing it touched. Not a ``WeakSet`` throughout: iterating one costs more than the rest
    of a healthy close's bookkeeping, and a close iterates its activities a dozen times."""

    __slots__ = ("_by_id", "_refs")

    def __init__(self) -> None:
        self._by_id: dict[int, T] = {}
        self._refs: list[weakref.ReferenceType[T]] | None = None

    def add(self, obj: T) -> None:
        if self._refs is None:
            self._by_id[id(obj)] = obj
        elif obj not in self:
            self._refs.append(weakref.ref(obj))

    def update(self, objs: Iterable[T]) -> None:
        for obj in objs:
            self.add(obj)

    def items(self) -> list[T]:
        if self._refs is None:
            return list(self._by_id.values())
        return [o for r in self._refs if (o := r()) is not None]

    def release(self) -> None:
        """The close ended: from now on, held weakly."""
        if self._refs is None:
            self._refs = [weakref.ref(o) for o in self._by_id.values()]
            self._by_id = {}

    def __contains__(self, obj: object) -> bool:
        if self._refs is None:
            return self._by_id.get(id(obj)) is obj
        return any(r() is obj for r in self._refs)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self._by_id) if self._refs is None else len(self.items())


class CloseBookkeeping:
    """The record of one close, appended to as it goes. Only what a forced close needs is
    formatted (the report is built from raw timestamps once, when someone reads it)."""

    # what the report names, set by the close (:class:`~.bounded_close.BoundedClose`)
    t0: float
    options: Options
    reason: str
    escalated_ms: float | None
    escalated_by: str | None
    _label: str | Callable[[], str]
    _drain_requested: bool
    _phases: dict[str, float]  # monotonic
    _ended_at: float | None

    def __init__(self) -> None:
        self.waiters: set[asyncio.Task[Any]] = set()  # tasks awaiting the close: spared
        self.cancelled_tasks: Held[asyncio.Task[Any]] = Held()
        self.zombies: Held[asyncio.Task[Any]] = Held()
        self.pending: list[asyncio.Future[Any]] = []  # abandoned steps
        self.activities: Held[Any] = Held()  # for the audit
        # outputs (before detached) and speech handles: their helper tasks work for the session
        self.io_objects: Held[Any] = Held()
        self.forced = False
        self._speech_listener: Callable[[Any], None] | None = None
        self._steps: list[RawStep] = []
        self._stuck: dict[int, StuckTask] = {}
        self._cancelled: list[str] = []
        self._abandoned: list[str] = []
        self._swept: list[str] = []
        self._left_open: list[str] = []

    def note_speeches_of(self, session: Any) -> None:
        """From the first forcing on, every speech the session creates is the close's: a
        reply made on an activity the close already forced (``generate_reply`` from a tool
        or a user turn) is cancelled by upstream's ``aclose``, which leaves its scheduling
        and authorization waits parked on its handle, working for the session. Once per
        close; :meth:`forget_speeches_of` ends it."""
        if self._speech_listener is None:
            self._speech_listener = lambda ev: self.io_objects.add(ev.speech_handle)
            session.on("speech_created", self._speech_listener)

    def forget_speeches_of(self, session: Any) -> None:
        if self._speech_listener is not None:
            session.off("speech_created", self._speech_listener)
            self._speech_listener = None

    def touch(self, activity: Any) -> None:
        """``activity`` takes part in this close (the audit looks at it afterwards)."""
        self.activities.add(activity)

    def record(self, name: str, started: float, outcome: StepOutcome, detail: str = "") -> None:
        self._steps.append((name, started, time.monotonic(), outcome, detail))
        if outcome == "timeout" or outcome == "abandoned":
            self.forced = True

    def release(self) -> None:
        """The close ended: what it touched is held weakly from now on."""
        for held in (self.activities, self.io_objects, self.cancelled_tasks, self.zombies):
            held.release()

    def steps(self) -> list[StepRecord]:
        return [StepRecord(n, round((e - s) * 1000, 1), o, d) for n, s, e, o, d in self._steps]

    def torn_down(self) -> list[str]:
        return [n for n, _, _, o, _ in self._steps if o == "done"]

    def note_stuck(self, task: asyncio.Future[Any], *, swallowed: bool = False) -> None:
        """Report ``task`` as stuck (once), with where it is parked."""
        if not isinstance(task, asyncio.Task):
            return
        entry = self._stuck.get(id(task))
        if entry is None:
            self._stuck[id(task)] = stuck_task(task, swallowed_cancel=swallowed)
        elif swallowed:
            entry.swallowed_cancel = True
        self.forced = True

    def cancel(self, tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        """Cancel the live ``tasks`` the close may stop (never its own waiters), noting
        each as stuck and cancelled. Awaits nothing."""
        live = [t for t in tasks if not t.done() and t not in self.waiters]
        for t in live:
            self.note_stuck(t)
            self.cancelled_tasks.add(t)
            t.cancel()
        self._cancelled.extend(task_name(t) for t in live if task_name(t) not in self._cancelled)
        return live

    def mark_zombies(self, tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        for t in tasks:
            # a cancelled task the zombie awaits and that still runs is parked on a zombie in
            # turn (1.5.x: the tools' execute task awaits the tool again after its cancel)
            for z in (t, *(w for w in awaited_tasks(t) if swallowed_cancel(w))):
                self.zombies.add(z)
                self.note_stuck(z, swallowed=True)
        return tasks

    def abandon(self, name: str, fut: asyncio.Future[Any], started: float) -> None:
        """``fut`` hit its bound: cancel it once, leave it running, report where it is."""
        self.note_stuck(fut)
        fut.cancel()
        fut.add_done_callback(functools.partial(_retrieve, name))
        self.pending.append(fut)
        self._abandoned.append(name)
        self.record(name, started, "abandoned")

    async def sweep_streams(
        self, session: Any, deadline: float, entries: list[streams_mod.OpenStream] | None = None
    ) -> bool:
        """Stop the session's provider streams that are still open: cancel each stream's
        main task, and once more a slice of the time later, then wait until ``deadline``.
        A stream whose close waits for a provider goodbye ends at the second cancellation
        (the first one only started that wait when nobody closed the stream before: its
        speech was cancelled, not interrupted); one that swallows every cancellation is
        reported. ``entries``: the session's streams, when just matched. True when it had
        some to stop."""
        if entries is None:
            entries = streams_mod.streams_of(session)
        leftover = [e for e in entries if not e.task.done()]
        if not leftover:
            return False
        start = time.monotonic()
        tasks = {e.task for e in leftover}
        for e in leftover:
            self.note_stuck(e.task)
            e.task.cancel()
        await asyncio.wait(tasks, timeout=_left(deadline) * SWEEP_SLICE)
        for t in tasks:
            t.cancel()  # a no-op on a task that ended
        await asyncio.wait(tasks, timeout=_left(deadline))
        closed = [e for e in leftover if e.task.done()]
        self._swept.extend(e.label for e in closed)
        outcome: StepOutcome = "done" if len(closed) == len(leftover) else "timeout"
        self.record("streams.sweep", start, outcome, f"{len(closed)}/{len(leftover)} stopped")
        self.forced = True
        return True

    def note_closed_by_force(self, labels: list[str]) -> None:
        """Streams a feature's finisher stopped (the ledger's labels)."""
        if labels:
            self._swept.extend(labels)
            self.forced = True

    def note_streams_left_open(
        self, session: Any, entries: list[streams_mod.OpenStream] | None = None
    ) -> None:
        """The session's streams (``entries``, when just matched) still open at the end."""
        for e in streams_mod.streams_of(session) if entries is None else entries:
            if not e.task.done():
                self._left_open.append(e.label)
                self.note_stuck(e.task)

    def was_forced(self) -> bool:
        """What the report's ``forced`` says: a bound was hit, or something was left."""
        return self.forced or bool(self._abandoned or self._left_open)

    def duration(self) -> float:
        """Seconds from the request to the end of the close (or to now, while it runs)."""
        return (time.monotonic() if self._ended_at is None else self._ended_at) - self.t0

    def report(self, *, completed: bool) -> CloseReport:
        """The close report. Built from the raw record only when read (a healthy close's
        report usually never is): the figures are those of the close's end."""
        ended = time.monotonic() if self._ended_at is None else self._ended_at
        label = self._label if isinstance(self._label, str) else self._label()
        return CloseReport(
            session=label,
            reason=self.reason,
            drain_requested=self._drain_requested,
            drain_timeout=self.options.drain_timeout,
            close_timeout=self.options.close_timeout,
            started_at=time.time() - (time.monotonic() - self.t0),
            duration_ms=round((ended - self.t0) * 1000, 1),
            forced=self.was_forced(),
            escalated=self.escalated_ms is not None,
            completed=completed,
            steps=self.steps(),
            stuck=list(self._stuck.values()),
            cancelled=list(self._cancelled),
            abandoned=list(self._abandoned),
            torn_down=self.torn_down(),
            streams_closed_by_force=list(self._swept),
            streams_left_open=list(self._left_open),
            phases={k: round((v - self.t0) * 1000, 1) for k, v in self._phases.items()},
            escalated_ms=self.escalated_ms,
            escalated_by=self.escalated_by,
        )


def _retrieve(name: str, fut: asyncio.Future[Any]) -> None:
    """An abandoned step that ends later with an exception (a drain resuming on the fresh
    lock trips upstream's lock assertion) is already in the report: its exception is read
    here and logged at DEBUG, not printed by the loop as "never retrieved"."""
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        logger.debug("abandoned step %s ended later with %r", name, exc)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
