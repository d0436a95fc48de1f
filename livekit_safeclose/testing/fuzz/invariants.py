"""What every replayed schedule must satisfy, observed while its leftovers still exist.

* ``bound``: every close request returns, and the close it started or joined ends, within
  its bound from the moment it was made (forced: ``close_timeout``; graceful:
  ``graceful_timeout + close_timeout``), plus :data:`MARGIN` for a loaded machine;
* ``close-events``: exactly one ``close`` event per lifetime of the session (each
  ``start()``), whatever mix of closes ended it;
* ``session-open``: a close requested while the session ran leaves it closed;
* ``provider-open`` / ``streams-open``: no provider connection and no stream of the session
  is open, but a stream that swallows every cancellation (a fault injected on purpose),
  which the close must then report as left open;
* ``tasks-left`` / ``audit``: nothing runs for the session any more (``audit(session)``
  clean), but the zombies the close reported; no timer of the session is pending;
* ``graceful-cut``: a graceful close that was never escalated forced nothing and let the
  slow tools finish;
* ``transcript``: the caller's last words, once transcribed (the STT's answer to the close's
  end-of-turn flush), are in the history;
* ``step-error`` / ``close-error``: the public API failed in a way it does not document.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import livekit_safeclose as lsc

from .._runs import tasks_since
from .schedule import Schedule
from .world import LAST_WORDS

#: slack on every bound for a loaded 2-core machine (event-loop latency, Silero inference)
MARGIN = 0.3


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


@dataclass
class Verdict:
    """One schedule's result."""

    schedule: Schedule
    patched: bool
    seconds: float
    violations: list[Violation] = field(default_factory=list)
    #: what was measured: ``ms`` (the slowest close request), ``provider_open``,
    #: ``streams_open``, ``close_events``, ``tasks_left``, ``report`` (the last close's)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def invariants(self) -> list[str]:
        """The invariants broken, each once, in the order found."""
        return list(dict.fromkeys(v.invariant for v in self.violations))


@dataclass
class Observation:
    """What one replay left, measured before anything was released."""

    replay: Any
    open_after_requests: bool
    provider_open: dict[str, int]
    streams_open: int
    audit: Any
    leftover: list[asyncio.Task[Any]]
    history_text: str
    reports: list[Any]


def observe(replay: Any, *, open_after_requests: bool) -> Observation:
    world = replay.world
    session = world.session
    ledger = world.ctx.ledger
    kinds = ("stt", "tts", "llm")
    mine = set(replay.tasks)
    before: set[asyncio.Task[Any]] = replay.before
    leftover = [t for t in tasks_since(before) if t not in mine]
    texts = [getattr(item, "text_content", None) or "" for item in session.history.items]
    report = lsc.last_close_report(session)
    return Observation(
        replay=replay,
        open_after_requests=open_after_requests,
        provider_open={k: ledger.open_count(k) for k in kinds},
        streams_open=lsc.open_streams(session)["total"] if replay.patched else 0,
        audit=lsc.audit(session),
        leftover=leftover,
        history_text="\n".join(texts),
        reports=[r for r in [*replay.reports, report] if r is not None],
    )


def _zombie_streams(schedule: Schedule, obs: Observation) -> dict[str, int]:
    """Streams a swallowing fault keeps open, as the close reported them left open."""
    setup = schedule.setup
    faults = {"stt": setup.stt_close, "llm": setup.llm_close, "tts": setup.tts_close}
    left = [label for r in obs.reports for label in r.streams_left_open]
    return {k: sum(lbl.startswith(k + ":") for lbl in set(left)) for k, f in faults.items() if f == "swallow"}


def _bounds(schedule: Schedule, obs: Observation, out: list[Violation]) -> None:
    setup, replay = schedule.setup, obs.replay
    for r in replay.world.requests:
        bound = setup.bound(r.graceful) + MARGIN
        if r.error and r.error != "job guard timed out":
            out.append(Violation("close-error", f"{r.path} raised {r.error}"))
        if r.path in ("aclose", "teardown", "job", "tool:aclose"):
            if r.returned is None:
                out.append(Violation("bound", f"{r.path} never returned"))
            elif r.returned - r.issued > bound:
                out.append(
                    Violation("bound", f"{r.path} returned after {r.returned - r.issued:.2f}s > {bound:.2f}s")
                )
        if r.close is None:
            continue
        end = replay.close_ends.get(id(r.close))
        if end is None:
            out.append(Violation("bound", f"the close {r.path} joined never ended"))
        elif end - r.issued > bound:
            out.append(
                Violation(
                    "bound", f"the close {r.path} joined ended {end - r.issued:.2f}s after it > {bound:.2f}s"
                )
            )


def _events(obs: Observation, out: list[Violation]) -> None:
    world = obs.replay.world
    if len(world.close_events) != world.starts:
        out.append(
            Violation("close-events", f"{len(world.close_events)} close event(s) for {world.starts} start(s)")
        )
    if obs.open_after_requests:
        out.append(Violation("session-open", "the session still runs after every close request returned"))


def _leftovers(schedule: Schedule, obs: Observation, out: list[Violation]) -> None:
    allowed = _zombie_streams(schedule, obs)
    for kind, n in obs.provider_open.items():
        if n > allowed.get(kind, 0):
            out.append(Violation("provider-open", f"{n} {kind} connection(s) open at the provider"))
    if obs.streams_open > sum(allowed.values()):
        out.append(Violation("streams-open", f"{obs.streams_open} stream(s) of the session open"))
    zombies = {t for c in obs.replay.closes for t in c.zombies}
    alive = [t for t in obs.leftover if t not in zombies]
    if alive:
        names = ", ".join(sorted({t.get_name() + ":" + _where(t) for t in alive}))
        out.append(Violation("tasks-left", f"{len(alive)} task(s) still running: {names}"))
    audit = obs.audit
    if audit.tasks or audit.timers or [z for z in audit.zombies if not _reported(z, obs)]:
        out.append(Violation("audit", audit.describe().splitlines()[0] + f" ({len(audit.tasks)} tasks, "
                             f"{len(audit.zombies)} zombies, timers {audit.timers})"))  # fmt: skip


def _reported(zombie: Any, obs: Observation) -> bool:
    return any(zombie.name == s.name for r in obs.reports for s in r.stuck)


def _where(task: asyncio.Task[Any]) -> str:
    from ...stacks import await_chain, parked_at

    return parked_at(await_chain(task)).rsplit("/", 1)[-1]


def _graceful(obs: Observation, out: list[Violation]) -> None:
    replay = obs.replay
    for close in replay.closes:
        if not close._drain_requested or close.escalated_ms is not None:
            continue
        end = replay.close_ends.get(id(close), float("inf"))
        if close.forced:
            out.append(
                Violation("graceful-cut", "a graceful close that was never escalated forced something")
            )
        if any(close.t0 <= t <= end for t in replay.world.slow_cancelled):
            out.append(Violation("graceful-cut", "a graceful close cancelled a slow tool"))


def _transcript(obs: Observation, out: list[Violation]) -> None:
    if obs.replay.world.transcribed and LAST_WORDS not in obs.history_text:
        out.append(
            Violation("transcript", "the caller's last words were transcribed but are not in the history")
        )


def check(schedule: Schedule, obs: Observation, *, patched: bool, seconds: float) -> Verdict:
    out: list[Violation] = []
    _bounds(schedule, obs, out)
    _events(obs, out)
    _leftovers(schedule, obs, out)
    if patched:
        _graceful(obs, out)
    _transcript(obs, out)
    out.extend(Violation("step-error", e) for e in obs.replay.world.step_errors)
    return Verdict(schedule, patched, round(seconds, 3), out, _facts(obs))


def _facts(obs: Observation) -> dict[str, Any]:
    replay = obs.replay
    waits = [
        (r.returned if r.returned is not None else replay.close_ends.get(id(r.close), r.issued)) - r.issued
        for r in replay.world.requests
    ]
    zombies = {t for c in replay.closes for t in c.zombies}
    return {
        "ms": round(max(waits, default=0.0) * 1000, 1),
        "provider_open": sum(obs.provider_open.values()),
        "streams_open": obs.streams_open,
        "close_events": len(replay.world.close_events),
        "tasks_left": len([t for t in obs.leftover if t not in zombies]),
        "report": obs.reports[-1] if obs.reports else None,
    }
