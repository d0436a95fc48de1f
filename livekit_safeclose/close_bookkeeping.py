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
from typing import Any

from . import streams as streams_mod
from .report import StepOutcome, StepRecord, StuckTask, logger, stuck_task
from .stacks import awaited_tasks, swallowed_cancel, task_name


class CloseBookkeeping:
    """The record of one close, appended to as it goes."""

    def __init__(self) -> None:
        self.waiters: set[asyncio.Task[Any]] = set()  # tasks awaiting the close: spared
        self.cancelled_tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self.zombies: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self.pending: list[asyncio.Future[Any]] = []  # abandoned steps
        # weak: a finished close (kept on the session for its report) must not pin what
        # it touched; a task still running on an activity's behalf keeps it alive anyway
        self.activities: weakref.WeakSet[Any] = weakref.WeakSet()  # for the audit
        self.forced = False
        self._steps: list[StepRecord] = []
        self._stuck: dict[int, StuckTask] = {}
        self._cancelled: list[str] = []
        self._abandoned: list[str] = []
        self._torn_down: list[str] = []
        self._swept: list[str] = []
        self._left_open: list[str] = []

    def touch(self, activity: Any) -> None:
        """``activity`` takes part in this close (the audit looks at it afterwards)."""
        self.activities.add(activity)

    def record(self, name: str, started: float, outcome: StepOutcome, detail: str = "") -> None:
        ms = round((time.monotonic() - started) * 1000, 1)
        self._steps.append(StepRecord(name=name, ms=ms, outcome=outcome, detail=detail))
        if outcome in ("timeout", "abandoned"):
            self.forced = True
        elif outcome == "done":
            self._torn_down.append(name)

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

    def note_streams_left_open(self, session: Any) -> None:
        for e in streams_mod.streams_of(session):
            if not e.task.done():
                self._left_open.append(e.label)
                self.note_stuck(e.task)


def _retrieve(name: str, fut: asyncio.Future[Any]) -> None:
    """An abandoned step that ends later with an exception (a drain resuming on the fresh
    lock trips upstream's lock assertion) is already in the report: its exception is read
    here and logged at DEBUG, not printed by the loop as "never retrieved"."""
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        logger.debug("abandoned step %s ended later with %r", name, exc)
