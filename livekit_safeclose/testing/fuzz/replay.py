"""Replaying a schedule step by step on a real ``AgentSession``, then checking it.

The session is started at once (in a task: steps may run while ``start()`` still does);
each step acts on it without waiting for the session to react, so close requests overlap
with whatever the earlier steps set going. Close requests never block the replay: an
awaited one (``aclose``, the job's callback) runs in a task of its own. After the last step
every request is waited for (bounded), a session that no effective request closed is closed
by a final ``aclose``, and the invariants are checked while everything the schedule set
going is still there to be seen; only then is it all released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from livekit.agents import llm, stt, tts
from livekit.agents.voice.events import CloseReason

import livekit_safeclose as lsc

from ...bounded_close import closing_of
from .._runs import LayerForRun, cancel_since
from ..fakes import DeadAudioOutput, FakeTTS, FastAudioOutput, SilenceInput
from ..features import close_transcript_wait

if TYPE_CHECKING:
    from ..scenarios.runner import Outcome
from .invariants import MARGIN, Observation, Verdict, check, observe
from .schedule import Schedule, Step
from .world import Request, World, build_session, first_agent, heard_by

#: how long a ``started`` step waits for ``start()``
START_WAIT = 0.5
#: the job's guard around its shutdown callback (``asyncio.wait_for``), kept short so the
#: guard's cancellation of the close's caller is part of the schedule
JOB_GUARD = 0.3
#: how long vanilla gets to close before the replay stops waiting for it
VANILLA_LIMIT = 1.0


class Replay:
    """One schedule's run: the world, the tasks it started, the closes it saw."""

    def __init__(self, schedule: Schedule, *, patched: bool) -> None:
        self.schedule, self.patched = schedule, patched
        self.world = World(schedule.setup)
        self.world.on_request = lambda req: self.tasks.append(asyncio.ensure_future(self._link(req)))
        self.tasks: list[asyncio.Future[Any]] = []  # the replay's own: starters, awaited closes
        self.close_ends: dict[int, float] = {}  # id(BoundedClose) -> when its task ended
        self.closes: list[Any] = []  # every BoundedClose a request started or joined
        self.reports: list[Any] = []  # their reports, as each close ended
        self.before: set[asyncio.Task[Any]] = set()

    # -- driving -------------------------------------------------------------------------
    async def start(self) -> None:
        w = self.world
        if not w.running():  # a restart of a session still open is no new lifetime
            w.starts += 1
        self._last_start_index = len(w.requests)
        session = w.session
        if session.input.audio is None:  # a restart: the close detached the I/O
            session.input.audio = SilenceInput()
            session.output.audio = FastAudioOutput()
        self.tasks.append(asyncio.ensure_future(session.start(first_agent(w))))
        await asyncio.sleep(0)  # start() holds the session lock from its first step

    async def step(self, step: Step) -> None:
        try:
            await self._step(step)
        except RuntimeError:
            pass  # "isn't running", "is closing": the public API refusing, as documented
        except Exception as exc:
            self.world.step_errors.append(f"{step.source()}: {type(exc).__name__}: {exc}")

    async def _step(self, step: Step) -> None:
        session, arg = self.world.session, step.arg
        if step.kind == "wait":
            await asyncio.sleep(float(arg or 0) / 1000)
        elif step.kind == "started":
            await asyncio.wait(self.tasks[-1:], timeout=START_WAIT)
        elif step.kind == "user":
            session.generate_reply(user_input=f"do:{arg}")
        elif step.kind == "say":
            session.say("Let me tell you about our offers.", allow_interruptions=bool(arg))
        elif step.kind == "interrupt":
            _quiet(session.interrupt(force=bool(arg)))
        elif step.kind == "hangup":
            if self.world.running() and session.output.audio is not None:
                session.output.audio = DeadAudioOutput()
        elif step.kind == "tts_stall":
            assert isinstance(session.tts, FakeTTS)
            session.tts.stall = True
        elif step.kind == "error":
            self._error(str(arg))
        elif step.kind == "close":
            self.close(str(arg))
        elif step.kind == "restart":
            await self.settle()
            if not self.world.running():  # a restart is a start after the close ended
                await self.start()

    def close(self, path: str) -> Request:
        """Issue one close request along ``path``; never waits for it."""
        session = self.world.session
        req = self.world.request(path, graceful=path == "graceful")
        if path == "aclose" or path == "teardown":
            self._awaited(req, session.aclose())
        elif path == "job":
            guarded = asyncio.wait_for(session._aclose_impl(reason=CloseReason.JOB_SHUTDOWN), JOB_GUARD)
            self._awaited(req, guarded)
        elif path in ("shutdown", "graceful"):
            session.shutdown(drain=path == "graceful")
        elif path == "disconnect":
            session._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
        self.tasks.append(asyncio.ensure_future(self._link(req)))
        return req

    def _error(self, kind: str) -> None:
        session = self.world.session
        model: Any = {"stt": session.stt, "llm": session.llm, "tts": session.tts}[kind]
        req = self.world.request(f"error:{kind}", graceful=False, running=heard_by(session, model))
        cls: Any = {"stt": stt.STTError, "llm": llm.LLMError, "tts": tts.TTSError}[kind]
        err = cls(timestamp=time.time(), label="fuzz", error=RuntimeError("provider gone"), recoverable=False)
        for _ in range(session.conn_options.max_unrecoverable_errors + 1):
            model.emit("error", err)
        if req.running:
            self.tasks.append(asyncio.ensure_future(self._link(req)))

    def _awaited(self, req: Request, aw: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await aw
            except asyncio.TimeoutError:
                req.error = "job guard timed out"  # the job moved on; the close goes on
            except Exception as exc:
                req.error = f"{type(exc).__name__}: {exc}"
            finally:
                req.returned = time.monotonic()

        self.tasks.append(asyncio.ensure_future(run()))

    async def _link(self, req: Request) -> None:
        """The layer's close ``req`` started or joined (it exists a loop turn or two
        later), with the moment it ends."""
        for _ in range(3):
            await asyncio.sleep(0)
            session = self.world.session
            close = closing_of(session)
            if close is not None and close.task is not None:
                req.close = close
                if close not in self.closes:
                    self.closes.append(close)
                    close.task.add_done_callback(functools.partial(self._ended, close))
                return

    def _ended(self, close: Any, _task: asyncio.Task[None]) -> None:
        self.close_ends.setdefault(id(close), time.monotonic())
        self.reports.append(lsc.last_close_report(self.world.session))

    # -- waiting -------------------------------------------------------------------------
    def _deadline(self) -> float:
        reqs = self.world.requests
        if not reqs:
            return time.monotonic() + 0.2
        setup = self.schedule.setup
        if not self.patched:
            return max(r.issued for r in reqs) + VANILLA_LIMIT + _slower_close(setup.transcript_timeout)
        return max(r.issued + setup.bound(r.graceful) for r in reqs) + MARGIN + 0.5

    async def settle(self) -> None:
        """Wait (bounded) until every request returned and no close is in flight."""
        deadline = self._deadline()
        while time.monotonic() < deadline:
            busy = [t for t in self.tasks if not t.done()]
            session = self.world.session
            close = closing_of(session)
            for task in (close.task if close is not None else None, session._closing_task):
                if task is not None and not task.done():
                    busy.append(task)
            if not busy:
                return
            await asyncio.wait(busy, timeout=max(0.0, deadline - time.monotonic()))

    async def run(self) -> Observation:
        await self.start()
        for step in self.schedule.steps:
            await self.step(step)
        await self.settle()
        # the session lock alone does not count: an abandoned close parked on a zombie
        # holds it (reported as stuck); the session itself must be closed
        session = self.world.session
        still_open = bool(session._started) or session._activity is not None
        open_after_requests = still_open and any(
            r.running for r in self._since_last_start() if r.path != "teardown"
        )
        if self.world.running():
            self.close("teardown")
            await self.settle()
        await asyncio.sleep(0.01)  # a tool that awaited the close resumes and ends
        return observe(self, open_after_requests=open_after_requests)

    def _since_last_start(self) -> list[Request]:
        return self.world.requests[self._last_start_index :]

    _last_start_index = 0


def _quiet(fut: asyncio.Future[Any]) -> None:
    """An interrupt's future: its failure is upstream's answer, not a finding."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _slower_close(transcript_timeout: float) -> float:
    return max(0.0, close_transcript_wait(transcript_timeout) - transcript_timeout)


def for_release(schedule: Schedule) -> Schedule:
    """``schedule`` with its close bound lengthened by what a healthy close takes longer on
    this release: one without ``session_close_transcript_timeout`` waits a fixed time for the
    final transcript, so even vanilla's clean close could not keep the schedule's bound."""
    setup = schedule.setup
    extra = _slower_close(setup.transcript_timeout)
    if extra <= 0:
        return schedule
    longer = dataclasses.replace(setup, close_timeout=round(setup.close_timeout + extra, 3))
    return dataclasses.replace(schedule, setup=longer)


async def replay(schedule: Schedule, *, patched: bool = True) -> Verdict:
    """Replay ``schedule`` in the current event loop and check every invariant. The layer
    is installed with the schedule's bounds (``patched``) or removed, and restored after."""
    schedule = for_release(schedule)
    setup = schedule.setup
    layer = LayerForRun(
        patched,
        drain_timeout=min(setup.drain_timeout, setup.close_timeout),
        close_timeout=setup.close_timeout,
        graceful_timeout=setup.graceful_timeout,
    )
    before = set(asyncio.all_tasks())
    run = Replay(schedule, patched=patched)
    run.before = before
    session = build_session(run.world)
    session.on("close", lambda ev: run.world.close_events.append((time.monotonic(), ev)))
    t0 = time.monotonic()
    try:
        observation = await run.run()
        return check(schedule, observation, patched=patched, seconds=time.monotonic() - t0)
    finally:
        run.world.ctx.ledger.release()
        await cancel_since(before)
        layer.restore()


async def scenario_outcome(sc: Any, *, patched: bool) -> Outcome:
    """A fuzz-found catalogue scenario's run (its ``schedule`` replayed), as the catalogue's
    :class:`~..scenarios.runner.Outcome`: closed when every close kept its bound, and any
    other broken invariant in ``error``."""
    from ..scenarios.runner import Outcome

    verdict = await replay(sc.schedule, patched=patched)
    f = verdict.facts
    return Outcome(
        scenario=sc.id,
        patched=patched,
        closed="bound" not in verdict.invariants,
        ms=f["ms"],
        provider_open=f["provider_open"],
        streams_open=f["streams_open"] if patched else -1,
        close_events=f["close_events"],
        tasks_left=f["tasks_left"],
        report=f["report"] if patched else None,
        error="; ".join(str(v) for v in verdict.violations if v.invariant != "bound"),
    )
