"""One close of one session in flight: its bounds, its phase, and what it had to force.

Every wait of a close is measured against the same two deadlines (the drain bound and the
close bound), so the bounds of successive steps never add up. What the close did (steps,
stuck tasks, what it cancelled or abandoned) is kept by :class:`.CloseBookkeeping`, its base;
the :class:`CloseReport` is built from it once, at the end.

Cancellation rules enforced here:

* a bounded wait never cancels what it waits for (``asyncio.wait``, not ``wait_for``), so a
  step that swallows cancellation cannot hold the caller;
* a step that hit its bound is cancelled once and *abandoned*: left to finish on its own,
  and cancelled again only when the close ends (:meth:`settle_pending`);
* a task cancelled by the close that does not end within :data:`UNWIND_GRACE` is a
  *zombie*: reported with where it is parked, and never waited for again.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from . import watched
from .close_bookkeeping import CloseBookkeeping
from .options import Options
from .report import logger

T = TypeVar("T")

#: ``drain``: speech, tools and ``on_exit`` settle (and a ``start()`` in progress);
#: ``models``: the activity closes its models (the final transcript wait included);
#: ``steps``: the rest of upstream's teardown, until the close event;
#: ``after``: after the close event (session host, room io)
Phase = Literal["drain", "models", "steps", "after"]

#: time kept back at the end of the close bound for the final stream sweep
SWEEP_RESERVE = 0.25
#: time kept between the last teardown step and the end of upstream's close, so the close
#: event is always emitted before the close bound
EMIT_RESERVE = 0.15
#: after force-cancelling, how long a task may take to unwind before it counts as a zombie
UNWIND_GRACE = 0.5
#: room kept for the models' teardown after the drain, beyond the final-transcript wait
TEARDOWN_RESERVE = 0.5
#: how long closing the models may take beyond the final-transcript wait before the
#: session's streams are stopped from outside
MODEL_CLOSE_ALLOWANCE = 1.0
#: the teardown steps after the models (toolsets, recorder, IVR, forwarding tasks) get this
#: long together: a hung MCP server must not eat the whole close bound
STEP_ALLOWANCE = 1.0

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


class BoundedClose(CloseBookkeeping):
    """State of one session close, shared by every caller that joins it."""

    def __init__(
        self,
        *,
        session_label: str | Callable[[], str],
        options: Options,
        reason: str,
        graceful: bool,
        transcript_timeout: float,
        requested_at: float | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.graceful = graceful
        self.transcript_timeout = transcript_timeout
        # the bounds run from the request: a closing task made by shutdown() may start late
        self.t0 = time.monotonic() if requested_at is None else min(requested_at, time.monotonic())
        self._label, self.reason, self._drain_requested = session_label, reason, graceful
        self.phase: Phase = "drain"
        self._phase_started = self.t0
        self._phases: dict[str, float] = {"drain": self.t0}  # monotonic, rounded in the report
        # the waits on a bound (see wait_phase), each ``[which bound, wake, its timer]``: a
        # bound that moves earlier re-arms their timers (waking nobody); one that moves
        # later leaves them: a waiter whose timer fires re-reads its bound before it gives
        # up. The phase future is replaced (and the old one resolved) whenever the phase
        # moves: every waiter holds the one it started with. Plain futures, not Events:
        # waiting on one needs no task of its own
        self._loop = asyncio.get_running_loop()
        self._bound_waits: list[list[Any]] = []
        # per task made by :meth:`watch`: the wakes of the waits on it, called from inside it
        self._early_wakes: dict[asyncio.Future[Any], list[Callable[[], None]]] = {}
        self._phase_moved: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None  # the shared closing task
        self.upstream: asyncio.Future[None] | None = None  # upstream's close, watched
        self.held_by_abandoned_drain: set[int] = set()  # ids of activities
        self.close_emitted = False
        self.was_started = False  # the session was started (or starting) when the close began
        self.interrupted_start = False  # the close cancelled what start() waited on
        self.abandoned_in: Phase | None = None  # where upstream's close was abandoned
        self.ended = False  # the completion ran: the close no longer acts
        self._ended_at: float | None = None
        self.escalated_ms: float | None = None
        self.drain_deadline = math.inf
        self.close_deadline = math.inf
        self.escalated_by: str | None = None
        self._graceful_timer: asyncio.TimerHandle | None = None
        self._bound_now: tuple[float, float] = (math.inf, math.inf)
        if not graceful:
            self.drain_deadline = self.t0 + self.drain_budget()
            self.close_deadline = self.t0 + options.close_timeout
            self._rebound()
        elif options.graceful_timeout is not None:
            # a goodbye into a caller who already hung up never plays out: past this bound
            # the graceful close becomes a forced one
            self._graceful_timer = self._loop.call_later(
                self.left(self.t0 + options.graceful_timeout), self.escalate, "graceful_timeout"
            )

    # -- deadlines -----------------------------------------------------------------------
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

    def holds_transcript(self) -> bool:
        """``close_timeout`` has room for the final-transcript wait and the teardown after
        it (when it has not, the wait is shortened and that was warned)."""
        need = self.transcript_timeout + TEARDOWN_RESERVE + SWEEP_RESERVE + EMIT_RESERVE
        return self.options.close_timeout >= need

    def escalate(self, by: str = "forced close", at: float | None = None) -> None:
        """A forced close joined a graceful one (or ``graceful_timeout`` passed): from now
        (or from ``at``, when the forced request was made) on the bounds apply."""
        if not self.graceful:
            return
        self.graceful = False
        if self._graceful_timer is not None:
            self._graceful_timer.cancel()
        now = time.monotonic() if at is None else max(self.t0, min(at, time.monotonic()))
        self.escalated_ms = round((now - self.t0) * 1000, 1)
        self.escalated_by = by
        self.drain_deadline = min(self.drain_deadline, now + self.drain_budget())
        self.close_deadline = min(self.close_deadline, now + self.options.close_timeout)
        self._rebound()
        self._retarget()

    def cut_drain(self) -> None:
        """What the drain phase still waits on gets only the unwind grace from now."""
        self.drain_deadline = min(self.drain_deadline, self.grace())
        self._rebound()
        self._retarget()

    def enter_phase(self, phase: Phase) -> None:
        """Upstream's close moved on; leaving a graceful drain starts the close bound."""
        if phase == self.phase:
            return
        now = time.monotonic()
        before = self._bound_now[0]
        self.phase, self._phase_started = phase, now
        self._phases.setdefault(phase, now)
        if self.close_deadline == math.inf:
            self.close_deadline = now + self.options.close_timeout
            self.drain_deadline = now
        self._rebound()
        # only the phase's bound can have moved earlier: the drain bound moves here only
        # when leaving a graceful drain, where it was no bound (and still is none while
        # graceful), and the phase's bound was none either
        if self._bound_now[0] < before:
            self._retarget()
        if self._phase_moved is not None:
            moved, self._phase_moved = self._phase_moved, None
            moved.set_result(None)

    def _retarget(self) -> None:
        """A bound moved earlier: every wait on a bound is re-armed at its new value."""
        for wait in self._bound_waits:
            which, wake, timer = wait
            if timer is not None:
                timer.cancel()
            bound = self._bound_now[which]
            wait[2] = None if bound == math.inf else self._loop.call_later(self.left(bound), wake)

    def _rebound(self) -> None:
        """Recompute what waiters wait until (every change of a bound, the phase or the
        mode comes through here; waiters read it on every wake)."""
        self._bound_now = (self.phase_deadline(), math.inf if self.graceful else self.drain_deadline)

    def steps_deadline(self) -> float:
        """Where every teardown step must have ended."""
        return self.close_deadline - SWEEP_RESERVE - EMIT_RESERVE

    def inner_deadline(self) -> float:
        """Where upstream's close itself (teardown, close event, room io) must have ended."""
        return self.close_deadline - SWEEP_RESERVE

    def phase_deadline(self) -> float:
        """The bound of the phase upstream's close is in."""
        if self.phase == "drain":
            return math.inf if self.graceful else self.drain_deadline
        if self.phase == "models":
            return self.steps_deadline()
        if self.phase == "steps":
            return min(self.steps_deadline(), self._phase_started + STEP_ALLOWANCE)
        return self.inner_deadline()

    @staticmethod
    def left(deadline: float) -> float:
        return max(0.0, deadline - time.monotonic())

    def grace(self) -> float:
        """A deadline one unwind grace from now, never past the teardown bound."""
        return min(self.steps_deadline(), time.monotonic() + UNWIND_GRACE)

    def drain_grace(self) -> float:
        """The unwind grace inside the drain phase: at most a quarter of what is left of the
        teardown bound, so forcing (and quarantining) a drain that holds zombies still
        leaves the models phase time to close the activity."""
        now = time.monotonic()
        return min(self.grace(), now + max(0.0, self.steps_deadline() - now) / 4)

    # -- waiting -------------------------------------------------------------------------
    def watch(self, aw: Awaitable[T]) -> asyncio.Task[T]:
        """Run an upstream call in a task of its own (see :mod:`.watched`), so that a bound
        can abandon it; the waits on it are woken from inside that task as it returns."""
        wakes: list[Callable[[], None]] = []
        task = watched.start(aw, wakes)
        self._early_wakes[task] = wakes
        return task

    async def _first(
        self, futs: tuple[asyncio.Future[Any], ...], deadline: float, bound: int | None = None
    ) -> None:
        """Until one of ``futs`` is done or ``deadline`` passed; cancels none of them. What
        ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` does, with one future and one
        timer (every wait of every close goes through here). ``bound``: ``deadline`` is that
        bound of the close (0: the phase's, 1: the drain's), re-armed when it moves earlier."""
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: Any = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        # a task made by watch() wakes its waits itself (from inside, and as it ends): they
        # add no done callback of their own
        early_wakes = self._early_wakes
        registered = [(f, early_wakes.get(f)) for f in futs]
        for f, early in registered:
            if early is None:
                f.add_done_callback(wake)
            else:
                early.append(wake)
        wait: list[Any] = [
            bound,
            wake,
            None if deadline == math.inf else loop.call_later(self.left(deadline), wake),
        ]
        if bound is not None:
            self._bound_waits.append(wait)
        try:
            await waiter
        finally:
            if bound is not None:
                self._bound_waits.remove(wait)
            if wait[2] is not None:
                wait[2].cancel()
            for f, early in registered:
                if early is None:
                    f.remove_done_callback(wake)
                elif wake in early:
                    early.remove(wake)

    async def wait_until(self, fut: asyncio.Future[Any], deadline: float) -> bool:
        """Wait for ``fut`` until ``deadline``; never cancels it. True when it finished."""
        if not fut.done():
            await self._first((fut,), deadline)
        return fut.done()

    async def wait_phase(self, fut: asyncio.Future[Any], *, drain: bool = False) -> bool:
        """Wait for ``fut`` under the current phase's bound (``drain``: the drain bound,
        whatever the phase), re-reading it whenever it moves (an escalation, a new
        phase). True when ``fut`` finished, False when the bound passed."""
        which = 1 if drain else 0
        while not fut.done():
            await self._first((fut,), self._bound_now[which], which)
            if fut.done():
                break
            if self._bound_now[which] <= time.monotonic():
                return False
        return True

    async def wait_phase_change(self, fut: asyncio.Future[Any], phase: Phase, deadline: float) -> bool:
        """Wait until ``fut`` finished or the close left ``phase``, at most until
        ``deadline``. True when either happened."""
        while not fut.done() and self.phase == phase:
            if self._phase_moved is None:
                self._phase_moved = self._loop.create_future()
            moved = self._phase_moved
            await self._first((fut, moved), deadline)
            if not fut.done() and not moved.done():
                return False
        return True

    # -- bounded bookkeeping -------------------------------------------------------------
    async def settle(
        self, name: str, tasks: list[asyncio.Task[Any]], deadline: float | None = None
    ) -> list[asyncio.Task[Any]]:
        """Cancel ``tasks`` and give them the unwind grace (or until ``deadline``); returns
        the zombies among them."""
        live = [t for t in tasks if not t.done() and t not in self.zombies and t not in self.waiters]
        if not live:
            return []
        start = time.monotonic()
        self.cancel(live)
        await asyncio.wait(live, timeout=self.left(self.grace() if deadline is None else deadline))
        stuck = self.mark_zombies([t for t in live if not t.done()])
        self.record(name, start, "timeout" if stuck else "done", f"{len(stuck)} did not end" if stuck else "")
        return stuck

    async def step(self, name: str, aw: Awaitable[T], deadline: float | None = None) -> T | None:
        """Run one teardown step bounded by ``deadline`` (default: one step allowance,
        within the teardown bound). On the bound it is abandoned."""
        start = time.monotonic()
        if deadline is None:
            deadline = min(self.steps_deadline(), start + STEP_ALLOWANCE)
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        if not await self.wait_until(task, deadline):
            self.abandon(name, task, start)
            return None
        if task.cancelled():
            self.record(name, start, "cancelled")
            return None
        if (exc := task.exception()) is not None:
            self.record(name, start, "error", f"{type(exc).__name__}: {exc}")
            return None
        self.record(name, start, "done")
        return task.result()

    async def settle_pending(self, deadline: float) -> None:
        """The close ends: what was abandoned gets until ``deadline``, then is cancelled."""
        pending = [t for t in self.pending if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.left(min(deadline, time.monotonic() + UNWIND_GRACE)))
            for t in pending:
                t.cancel()
        self.pending.clear()

    # -- output --------------------------------------------------------------------------------
    def end(self) -> None:
        """The close is over: it no longer acts, and its timer is gone."""
        self.ended = True
        self._ended_at = time.monotonic()
        self._early_wakes.clear()
        if self._graceful_timer is not None:
            self._graceful_timer.cancel()
            self._graceful_timer = None
        self.release()


#: where a session keeps its close (the live one, or the last one)
CLOSE_ATTR = "_safeclose_close"


def closing_of(session: Any, *, live_only: bool = True) -> BoundedClose | None:
    """The close of ``session`` in flight (``live_only``), or its most recent one."""
    close: BoundedClose | None = session.__dict__.get(CLOSE_ATTR)
    if close is None or (live_only and close.ended):
        return None
    return close
