"""Real 1.8.9 workers whose jobs end by themselves and then hang in one teardown step.

One worker runs vanilla livekit-agents, one ``livekit_safeclose.install(drain_timeout=0.3,
close_timeout=1, graceful_timeout=1)`` (``agents/teardown_agent.py``), side by side against
their own stand-in dispatch server. Each is offered one job per room of :data:`ROOMS`; every
job starts a real AgentSession (in-memory models), then calls ``ctx.shutdown()`` (the
``end-call`` job: its EndCallTool's goodbye into a dead audio sink) and hangs in the step its
room names. We watch each job's process for :data:`OBSERVE` seconds after the job ended
(vanilla: a bounded look; whatever is left is SIGKILLed). Times are seconds after the
session's ``close`` event, where the job's teardown begins.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from worker_harness import API_KEY, API_SECRET, WorkerProcess, pid_alive

from livekit_safeclose.testing.dispatch import DispatchServer
from livekit_safeclose.worker import bounds

CLOSE = 1.0
GRACEFUL = 1.0
ROOMS = (
    "healthy",
    "hang-callback",
    "raise-callback",
    "hang-disconnect",
    "hang-session-end",
    "hang-exit",
    "end-call",
)
#: seconds after a job's own end we watch its process (past the layer's worst bound: a process
#: hung at exit is killed teardown_bound() after ShuttingDown, plus the kill's 0.5 s)
OBSERVE = bounds.teardown_bound(CLOSE) + 2.5
MARGIN = 1.5  # on top of each bound and of the healthy job's teardown (a loaded 2-core machine)


@dataclass
class JobOutcome:
    room: str
    pid: int | None = None
    started_at: float | None = None  # session_started mark
    ended_at: float | None = None  # the session's close event (the teardown starts)
    exited_at: float | None = None
    marks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: upstream's "error while shutting down the job" (its wait for the callbacks ended)
    gather_failed: bool = False

    @property
    def exit_after(self) -> float | None:
        if self.exited_at is None or self.ended_at is None:
            return None
        return self.exited_at - self.ended_at

    def summary(self) -> str:
        ea = self.exit_after
        closed = None if self.ended_at is None or self.started_at is None else self.ended_at - self.started_at
        return (
            f"{self.room}: gather_failed={self.gather_failed} closed_after_start={'-' if closed is None else f'{closed:.2f}s'} "
            f"exit_after_close={'-' if ea is None else f'{ea:.2f}s'} marks={self.marks}"
        )


def _run(patched: bool, log_dir: Path) -> dict[str, JobOutcome]:
    log = log_dir / f"teardown-{'layer' if patched else 'vanilla'}.log"
    out = {room: JobOutcome(room) for room in ROOMS}
    env = {"SC_LAYER": "1" if patched else "", "SC_CLOSE": str(CLOSE), "SC_GRACEFUL": str(GRACEFUL)}
    with DispatchServer(api_key=API_KEY, api_secret=API_SECRET) as d:
        w = WorkerProcess("teardown_agent.py", d.url, log, env=env)
        try:
            w.start()
            d.wait_registered(30)
            for room in ROOMS:
                assert d.offer_job(10, room=room).accepted, f"{room} refused; see {log}"
            for room in ROOMS:
                started = w.wait_mark(f"job_start {room}", 30)
                assert started is not None, f"{room} never started; see {log}"
                out[room].pid = started.pid
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline:
                now = time.monotonic()
                for o in out.values():
                    if o.ended_at is None:
                        end = w.wait_mark(f"session_closed {o.room}", 0)
                        o.ended_at = None if end is None else end.at
                    if o.started_at is None:
                        st = w.wait_mark(f"session_started {o.room}", 0)
                        o.started_at = None if st is None else st.at
                    if o.exited_at is None and not pid_alive(o.pid):
                        o.exited_at = now
                if all(o.exited_at is not None for o in out.values()):
                    break
                ended = [o.ended_at for o in out.values() if o.ended_at is not None]
                # every job ended (or the end-call one never will, vanilla): a bounded look
                last = max(ended, default=w.started_at + 30.0)
                if now > last + OBSERVE + (0.0 if len(ended) == len(ROOMS) else GRACEFUL + CLOSE):
                    break
                time.sleep(0.05)
        finally:
            w.kill_group()
            for o in out.values():
                if pid_alive(o.pid):
                    assert o.pid is not None
                    try:
                        os.kill(o.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        by_pid = {o.pid: o for o in out.values()}
        for m in w.marks():
            for o in out.values():
                if m.text.endswith(f" {o.room}") or f" {o.room} " in m.text:
                    o.marks.append(m.text.split(" ", 1)[0])
        for r in w.records():
            if str(r.get("message", "")).startswith("error while shutting down the job"):
                pid = int(r.get("pid", 0))
                if pid in by_pid:
                    by_pid[pid].gather_failed = True
            if r.get("name") == "livekit.agents.safeclose" and r.get("level") == "WARNING":
                pid = int(r.get("pid", 0))
                if pid in by_pid:
                    by_pid[pid].warnings.append(str(r.get("message")))
                for o in out.values():  # the supervisor's kill names the job's pid
                    if o.pid is not None and f"job process {o.pid} " in str(r.get("message")):
                        o.warnings.append(str(r.get("message")))
    return out


_runs: dict[bool, dict[str, JobOutcome]] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict[str, JobOutcome]]:
    if not _runs:
        log_dir = tmp_path_factory.mktemp("teardown-logs")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fv = pool.submit(_run, False, log_dir)
            fl = pool.submit(_run, True, log_dir)
            _runs[False], _runs[True] = fv.result(), fl.result()
        for patched, jobs in _runs.items():
            for o in jobs.values():
                print(("layer   " if patched else "vanilla ") + o.summary())
    return _runs


@pytest.mark.vanilla
@pytest.mark.timeout(120)
def test_vanilla_teardown_hangs_keep_the_job_process(runs: dict[bool, dict[str, JobOutcome]]) -> None:
    """Each hang keeps the job's process (and the worker's slot) forever; the EndCallTool's
    goodbye into a dead sink never even ends the session."""
    jobs = runs[False]
    for room in ("hang-callback", "hang-disconnect", "hang-session-end", "hang-exit"):
        o = jobs[room]
        assert o.ended_at is not None and o.exited_at is None, o.summary()
    assert "callback_done" in jobs["hang-callback"].marks, jobs["hang-callback"].summary()
    assert jobs["healthy"].exited_at is not None, jobs["healthy"].summary()
    # a callback that raises ends upstream's wait for the others at once: the process goes on
    # to exit under them (whether the 0.9 s one still finishes depends on how fast it exits)
    rc = jobs["raise-callback"]
    assert rc.exited_at is not None and rc.gather_failed, rc.summary()
    assert "job_shutdown" not in jobs["hang-session-end"].marks  # the callbacks never ran
    assert "job_shutdown" not in jobs["hang-disconnect"].marks
    end_call = jobs["end-call"]
    assert "session_closed" not in end_call.marks and end_call.exited_at is None, end_call.summary()


@pytest.mark.timeout(120)
def test_layer_bounds_each_teardown_step(runs: dict[bool, dict[str, JobOutcome]]) -> None:
    jobs = runs[True]
    base = jobs["healthy"].exit_after  # what a teardown takes on this machine right now
    assert base is not None, jobs["healthy"].summary()
    assert not [m for m in jobs["healthy"].warnings if "teardown" in m or "killing" in m]
    for room, bound in (
        ("hang-callback", CLOSE),
        ("raise-callback", 0.9),  # the other callback is waited for
        ("hang-disconnect", CLOSE),
        ("hang-session-end", CLOSE),
    ):
        o = jobs[room]
        assert o.exit_after is not None and o.exit_after <= base + bound + MARGIN, (base, o.summary())
        assert not any("killing it" in m for m in o.warnings), o.warnings  # the job side did it
    # a process hung at exit: killed by the supervisor teardown_bound() after ShuttingDown
    ex = jobs["hang-exit"]
    assert ex.exit_after is not None and ex.exit_after <= bounds.teardown_bound(CLOSE) + 0.5 + base, (
        ex.summary()
    )
    cb = jobs["hang-callback"]
    assert "callback_done" in cb.marks and "job_shutdown" in cb.marks, cb.summary()
    assert any("shutdown callback" in m and "hung_callback" in m for m in cb.warnings), cb.warnings
    rc = jobs["raise-callback"]
    assert "callback_done" in rc.marks and not rc.gather_failed, rc.summary()
    assert any("room.disconnect()" in m for m in jobs["hang-disconnect"].warnings)
    assert "job_shutdown" in jobs["hang-disconnect"].marks  # the callbacks ran after it
    se = jobs["hang-session-end"]
    assert any("_on_session_end()" in m for m in se.warnings) and "job_shutdown" in se.marks, se.summary()
    assert any("killing it" in m for m in jobs["hang-exit"].warnings), jobs["hang-exit"].warnings


@pytest.mark.timeout(120)
def test_layer_end_call_goodbye_into_dead_sink_ends_the_job(runs: dict[bool, dict[str, JobOutcome]]) -> None:
    o = runs[True]["end-call"]
    started = o.marks
    assert "session_closed" in started and "job_shutdown" in started, o.summary()
    base = runs[True]["healthy"].exit_after
    assert base is not None and o.exit_after is not None and o.exit_after <= base + MARGIN, o.summary()
    # the tool is called right after the start: the close follows within graceful + close
    assert o.started_at is not None and o.ended_at is not None, o.summary()
    assert o.ended_at - o.started_at <= GRACEFUL + CLOSE + MARGIN, o.summary()
    assert any(m.startswith("EndCallTool: the goodbye did not finish") for m in o.warnings), o.warnings
