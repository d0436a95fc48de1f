"""What one close did: its steps, the tasks it found stuck, cancelled, abandoned or left
as zombies, and the streams it stopped or left open.

Kept apart from the bounds (:mod:`.bounded_close`) because nothing here waits: every method
is synchronous, so bookkeeping can run inside a cancellation path or a done-callback. The
:class:`~.report.CloseReport` is built from this state once, at the end, and never read back
to decide anything.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from . import streams as streams_mod
from .report import StepOutcome, StepRecord, StuckTask, logger, stuck_task
from .stacks import awaited_tasks, swallowed_cancel, task_name

T = TypeVar("T")

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

    def __init__(self) -> None:
        self.waiters: set[asyncio.Task[Any]] = set()  # tasks awaiting the close: spared
        self.cancelled_tasks: Held[asyncio.Task[Any]] = Held()
        self.zombies: Held[asyncio.Task[Any]] = Held()
        self.pending: list[asyncio.Future[Any]] = []  # abandoned steps
        self.activities: Held[Any] = Held()  # for the audit
        # outputs (before detached) and speech handles: their helper tasks work for the session
        self.io_objects: Held[Any] = Held()
        self.forced = False
        self._steps: list[RawStep] = []
        self._stuck: dict[int, StuckTask] = {}
        self._cancelled: list[str] = []
        self._abandoned: list[str] = []
        self._swept: list[str] = []
        self._left_open: list[str] = []

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


def _retrieve(name: str, fut: asyncio.Future[Any]) -> None:
    """An abandoned step that ends later with an exception (a drain resuming on the fresh
    lock trips upstream's lock assertion) is already in the report: its exception is read
    here and logged at DEBUG, not printed by the loop as "never retrieved"."""
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        logger.debug("abandoned step %s ended later with %r", name, exc)
