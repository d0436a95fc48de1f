"""In-process tests of install_worker / uninstall_worker and the bounded end of drain's pieces
(the drain, the job-process close, the job side's shutdown), with upstream's internals faked
where a real worker would be needed; the real thing runs in test_worker_bounded_end.py."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, SimpleNamespace
from typing import Any

import pytest
from livekit.agents.cli import cli as lk_cli
from livekit.agents.ipc import channel, job_proc_lazy_main, supervised_proc
from livekit.agents.job import JobRequest
from livekit.agents.worker import AgentServer

from livekit_safeclose import IncompatibleLivekitAgents
from livekit_safeclose import worker as sc

CLI_MODULE = "livekit.agents.cli.cli"


def _snapshot() -> dict[str, Any]:
    import asyncio.unix_events as unix_events

    return {
        "drain": AgentServer.__dict__["drain"],
        "_is_available": AgentServer.__dict__["_is_available"],
        "_update_worker_status": AgentServer.__dict__["_update_worker_status"],
        "accept": JobRequest.__dict__["accept"],
        "aclose": supervised_proc.SupervisedProc.__dict__["aclose"],
        "_shutdown_job": job_proc_lazy_main._JobProc.__dict__["_shutdown_job"],
        "guard": job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT,
        "signal.signal": signal.signal,
        "add_signal_handler": unix_events._UnixSelectorEventLoop.__dict__["add_signal_handler"],
        "sigterm": signal.getsignal(signal.SIGTERM),
        "sigint": signal.getsignal(signal.SIGINT),
    }


@pytest.fixture
def clean() -> Iterator[dict[str, Any]]:
    """Upstream's state before the test; everything is uninstalled and restored after."""
    before = _snapshot()
    try:
        yield before
    finally:
        sc.uninstall_worker()
        for sig, key in ((signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint")):
            signal.signal(sig, before[key])
        assert _snapshot() == before


@pytest.mark.timeout(20)
def test_install_worker_patches_and_restores_exactly(clean: dict[str, Any]) -> None:
    sc.install_worker(close_timeout=3.0)
    assert sc.worker_installed() == {
        "signal_guard": True,
        "drain_availability": True,
        "bounded_drain_end": True,
    }
    now = _snapshot()
    for key in ("drain", "_is_available", "_update_worker_status", "accept", "aclose", "_shutdown_job"):
        assert now[key] is not clean[key], key
        assert now[key].__wrapped__ is clean[key], key
        assert now[key].__doc__ == clean[key].__doc__, key
    assert now["signal.signal"] is not clean["signal.signal"]
    assert now["add_signal_handler"] is not clean["add_signal_handler"]
    assert clean["guard"] == 60.0 and now["guard"] == 3.0 + sc.SESSION_GUARD_MARGIN
    assert now["sigterm"] is clean["sigterm"]  # nothing armed: the CLI never ran here

    sc.install_worker(close_timeout=5.0)  # idempotent: same functions, new bound
    again = _snapshot()
    assert {k: v for k, v in again.items() if k != "guard"} == {k: v for k, v in now.items() if k != "guard"}
    assert again["guard"] == 5.0 + sc.SESSION_GUARD_MARGIN and sc._end.close_timeout == 5.0

    sc.uninstall_worker()
    assert _snapshot() == clean
    assert sc.worker_installed() == dict.fromkeys(
        ("signal_guard", "drain_availability", "bounded_drain_end"), False
    )
    sc.uninstall_worker()  # no-op
    assert _snapshot() == clean


@pytest.mark.timeout(20)
def test_flags_opt_out_each_part(clean: dict[str, Any]) -> None:
    sc.install_worker(close_timeout=2.0, signal_guard=False, drain_availability=False)
    now = _snapshot()
    for key in ("_is_available", "_update_worker_status", "accept", "add_signal_handler"):
        assert now[key] is clean[key], key
    assert now["drain"] is not clean["drain"] and now["guard"] == 3.0

    sc.install_worker(close_timeout=2.0, bounded_drain_end=False, reject_late_accepts=False)
    now = _snapshot()
    for key in ("drain", "aclose", "_shutdown_job", "guard"):
        assert now[key] == clean[key], key
    assert (
        now["_is_available"] is not clean["_is_available"]
        and now["add_signal_handler"] is not clean["add_signal_handler"]
    )
    assert sc._state.reject_late_accepts is False

    sc.install_worker(
        close_timeout=2.0, signal_guard=False, drain_availability=False, bounded_drain_end=False
    )
    assert _snapshot() == clean


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
        ("3", TypeError),
    ],
)
def test_close_timeout_is_validated(clean: dict[str, Any], bad: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        sc.install_worker(close_timeout=bad)
    assert _snapshot() == clean


@pytest.mark.timeout(20)
def test_incompatible_release_raises_and_patches_nothing(
    clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lk_cli, "_run_worker", lambda server, args: None)  # no _force_exit inside
    with pytest.raises(IncompatibleLivekitAgents, match=r"_force_exit"):
        sc.install_worker(close_timeout=2.0)
    assert _snapshot() == clean and not any(sc.worker_installed().values())
    monkeypatch.undo()

    monkeypatch.delattr(job_proc_lazy_main._JobProc, "_shutdown_job")
    with pytest.raises(IncompatibleLivekitAgents, match=r"_JobProc\._shutdown_job"):
        sc.install_worker(close_timeout=2.0)
    assert not any(sc.worker_installed().values())
    monkeypatch.undo()
    assert _snapshot() == clean

    # the parts that do not need what is missing still install on their own
    monkeypatch.setattr(lk_cli, "_run_worker", lambda server, args: None)
    sc.install_worker(close_timeout=2.0, bounded_drain_end=False)
    assert sc.worker_installed()["signal_guard"]


@pytest.mark.timeout(20)
def test_harmless_in_a_process_without_worker(clean: dict[str, Any]) -> None:
    threads = set(threading.enumerate())
    t0 = time.perf_counter()
    sc.install_worker(close_timeout=2.0)
    assert time.perf_counter() - t0 < 0.5
    assert set(threading.enumerate()) == threads  # starts nothing
    calls: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)  # not armed: plain upstream semantics
    try:
        assert signal.getsignal(signal.SIGTERM) is handler
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert asyncio.run(asyncio.sleep(0, "ok")) == "ok"
    assert sc.forced_end_reason() is None


# -- the second signal ------------------------------------------------------------------------------


def _cli_handlers() -> tuple[Callable[[int, FrameType | None], None], Callable[[bool], None], list[str]]:
    """A stand-in for the CLI's ``_run_worker.<locals>._force_exit`` (same name, module and
    closure cell the patch reads); it records instead of ``os._exit(1)``."""
    calls: list[str] = []
    escalating = False

    def _force_exit(sig: int, frame: FrameType | None) -> None:
        nonlocal escalating
        if escalating:
            escalating = False
            calls.append("stray")
            return
        calls.append("exit")

    def set_escalating(v: bool) -> None:
        nonlocal escalating
        escalating = v

    _force_exit.__module__ = CLI_MODULE
    _force_exit.__qualname__ = "_run_worker.<locals>._force_exit"
    return _force_exit, set_escalating, calls


@pytest.mark.timeout(20)
def test_second_signal_forces_the_end_once(clean: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    sc.install_worker(close_timeout=1.0, signal_guard=False, drain_availability=False)
    force_exit, set_escalating, calls = _cli_handlers()
    signal.signal(signal.SIGTERM, force_exit)  # the CLI switching to its exit-now handler
    assert signal.getsignal(signal.SIGTERM) is sc._dispatch

    set_escalating(True)  # the CLI watchdog's re-signal of a blocked loop: not an operator's
    signal.raise_signal(signal.SIGTERM)
    assert calls == ["stray"] and sc.forced_end_reason() is None

    signal.raise_signal(signal.SIGTERM)  # the second signal: force the end instead of exiting
    assert calls == ["stray"]
    assert sc.forced_end_reason() == f"{sc.FORCED_REASON_PREFIX} (second SIGTERM)"
    assert sc._end.watchdog is not None and sc._end.watchdog.is_alive()
    assert any("second SIGTERM during shutdown" in r.getMessage() for r in caplog.records)

    signal.raise_signal(signal.SIGTERM)  # a third one: the CLI's exit at once
    assert calls == ["stray", "exit"]
    watchdog = sc._end.watchdog
    sc.uninstall_worker()  # cancels the exit watchdog
    watchdog.join(1)
    assert not watchdog.is_alive() and sc.forced_end_reason() is None


# -- the drain --------------------------------------------------------------------------------------


class _Server:
    active_jobs = ["J1"]


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_drain_outcomes(clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    sc.install_worker(close_timeout=1.0)

    async def finishes(self: Any, timeout: Any = None) -> None:
        await asyncio.sleep(0.01)

    monkeypatch.setattr(sc._end, "original_drain", finishes)
    await AgentServer.drain(_Server())  # type: ignore[arg-type]
    assert sc.forced_end_reason() is None  # a drain that finishes is never forced

    async def times_out(self: Any, timeout: Any = None) -> None:
        await asyncio.sleep(0.01)
        raise asyncio.TimeoutError

    monkeypatch.setattr(sc._end, "original_drain", times_out)
    with pytest.raises(asyncio.TimeoutError):
        await AgentServer.drain(_Server())  # type: ignore[arg-type]
    assert sc.forced_end_reason() == f"{sc.FORCED_REASON_PREFIX} (drain timed out)"


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_drain_ended_by_second_signal(clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    sc.install_worker(close_timeout=1.0)
    cancelled = asyncio.Event()

    async def long_drain(self: Any, timeout: Any = None) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(sc._end, "original_drain", long_drain)
    loop = asyncio.get_running_loop()
    # from another thread, like a signal handler would: wakes the drain through the loop
    threading.Timer(0.2, lambda: sc._begin_forced_end("second SIGTERM")).start()
    t0 = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await AgentServer.drain(_Server())  # type: ignore[arg-type]
    assert loop.time() - t0 < 2.0 and cancelled.is_set()
    with pytest.raises(asyncio.TimeoutError):  # a drain started after the signal ends at once
        await AgentServer.drain(_Server())  # type: ignore[arg-type]


# -- the job process close (main process side) ---------------------------------------------------------


class _Proc:
    """The parts of a SupervisedProc the bounded close touches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, running: bool = True) -> None:
        self.started = True
        self._closing = False
        self._initialize_fut: asyncio.Future[None] = loop.create_future()
        self._initialize_fut.set_result(None)
        self.running_job = object() if running else None
        self._pch = object()
        self.pid = 4242
        self.exited: asyncio.Future[None] = loop.create_future()
        self.events: list[str] = []

    async def kill(self) -> None:
        self.events.append("kill")
        if not self.exited.done():
            self.exited.set_result(None)


@pytest.fixture
def fast_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sc, "SESSION_GUARD_MARGIN", 0.0)
    monkeypatch.setattr(sc, "FORCED_END_GRACE", 0.0)
    monkeypatch.setattr(sc, "PROC_EXIT_SLACK", 0.1)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    out: list[Any] = []

    async def asend_message(pch: Any, msg: Any) -> None:
        out.append(msg)

    monkeypatch.setattr(channel, "asend_message", asend_message)
    return out


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_proc_close_forced_sends_reason_then_kills(
    clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch, fast_bound: None, sent: list[Any]
) -> None:
    sc.install_worker(close_timeout=0.2)
    proc = _Proc(asyncio.get_running_loop())

    async def upstream_aclose(self: _Proc) -> None:
        self.events.append(f"upstream(sent={len(sent)})")
        self._closing = True
        await self.exited  # waits for ShuttingDown / the exit: no bound upstream

    monkeypatch.setattr(sc._end, "original_proc_aclose", upstream_aclose)
    sc._begin_forced_end("drain timed out")
    t0 = time.monotonic()
    await supervised_proc.SupervisedProc.aclose(proc)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    assert [m.reason for m in sent] == [f"{sc.FORCED_REASON_PREFIX} (drain timed out)"]
    assert proc.events == ["upstream(sent=1)", "kill"]  # the reason went before upstream's request
    assert sc.proc_close_bound(0.2) <= elapsed < sc.proc_close_bound(0.2) + 1.0


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_proc_close_unforced_is_upstream_and_escalates(
    clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch, fast_bound: None, sent: list[Any]
) -> None:
    sc.install_worker(close_timeout=0.2)
    loop = asyncio.get_running_loop()

    async def upstream_aclose(self: _Proc) -> None:
        self.events.append("upstream")
        await self.exited

    monkeypatch.setattr(sc._end, "original_proc_aclose", upstream_aclose)
    quick = _Proc(loop)
    loop.call_later(0.05, quick.exited.set_result, None)
    await supervised_proc.SupervisedProc.aclose(quick)  # type: ignore[arg-type]
    assert quick.events == ["upstream"] and sent == []

    idle = _Proc(loop, running=False)  # an idle process in a forced end: no reason, still bounded
    slow = _Proc(loop)
    closes = [asyncio.ensure_future(supervised_proc.SupervisedProc.aclose(p)) for p in (idle, slow)]  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert not any(c.done() for c in closes)
    slow._closing = True  # upstream's request already went out: the job is in its own shutdown
    sc._begin_forced_end("second SIGTERM")
    await asyncio.wait_for(asyncio.gather(*closes), 3)
    assert idle.events == ["upstream", "kill"] and slow.events == ["upstream", "kill"]
    assert sent == []


# -- the job side -----------------------------------------------------------------------------------------


class _Session:
    def __init__(self) -> None:
        self.closed_at: float | None = None

    async def aclose(self) -> None:
        await asyncio.sleep(0.05)
        self.closed_at = time.monotonic()


def _job(session: _Session) -> Any:
    ctx = SimpleNamespace(_primary_agent_session=session, job=SimpleNamespace(id="AJ_7"))
    return SimpleNamespace(_job_ctx=ctx, _session_end_timeout=300.0)


async def _user_background_loop() -> None:
    await asyncio.Event().wait()


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_job_shutdown_forced_reason(
    clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sc.install_worker(close_timeout=2.0)
    caplog.set_level("INFO", logger="livekit.agents.safeclose")
    calls: list[tuple[str, float]] = []

    async def upstream_shutdown_job(self: Any, entry: asyncio.Task[None], info: Any) -> None:
        calls.append((info.reason, time.monotonic()))

    monkeypatch.setattr(sc._end, "original_shutdown_job", upstream_shutdown_job)
    session = _Session()
    job = _job(session)
    entry = asyncio.ensure_future(asyncio.sleep(60))  # an entrypoint still running
    background = asyncio.ensure_future(_user_background_loop())
    reason = f"{sc.FORCED_REASON_PREFIX} (drain timed out)"
    try:
        await job_proc_lazy_main._JobProc._shutdown_job(job, entry, SimpleNamespace(reason=reason))  # type: ignore[arg-type]
    finally:
        background.cancel()
    assert session.closed_at is not None and calls and session.closed_at <= calls[0][1]
    assert entry.cancelled()  # not the 15 s upstream wait
    assert job._session_end_timeout == sc.FORCED_END_GRACE
    leftovers = [r for r in caplog.records if hasattr(r, "safeclose_job_leftovers")]
    assert len(leftovers) == 1
    snap = leftovers[0].safeclose_job_leftovers
    assert snap["job_id"] == "AJ_7" and snap["reason"] == reason
    assert any("_user_background_loop" in t["name"] and t["module"] == __name__ for t in snap["tasks"]), snap

    # any other reason: upstream's sequence untouched
    calls.clear()
    session2 = _Session()
    job2 = _job(session2)
    entry2 = asyncio.ensure_future(asyncio.sleep(60))
    await job_proc_lazy_main._JobProc._shutdown_job(job2, entry2, SimpleNamespace(reason="job done"))  # type: ignore[arg-type]
    assert calls and calls[0][0] == "job done"
    assert session2.closed_at is None and not entry2.done() and job2._session_end_timeout == 300.0
    entry2.cancel()


# -- the idle report --------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_idle_report_reads_the_process_tree() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.2)
        report = sc.idle_report(interval=0.2)
        assert report.main_pid == os.getpid() and report.processes[0].role == "main"
        mine = [p for p in report.processes if p.pid == child.pid]
        assert mine and mine[0].ppid == os.getpid() and mine[0].rss_mb > 1 and mine[0].role == "other"
        assert mine[0].cpu_percent is not None and mine[0].cpu_percent < 50
        assert str(child.pid) in report.summary()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "livekit_safeclose.worker",
                "idle-report",
                "--pid",
                str(os.getpid()),
                "--interval",
                "0",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
        data = json.loads(out.stdout)
        assert data["main_pid"] == os.getpid() and child.pid in [p["pid"] for p in data["processes"]]
    finally:
        child.kill()
        child.wait(5)


@pytest.mark.timeout(20)
def test_second_signal_before_the_drain_started(clean: dict[str, Any]) -> None:
    """The CLI's first handler, ``_handle_exit``, called again before the CLI switched to
    ``_force_exit`` (the loop had not served the first exit yet): also forced, not exited."""
    sc.install_worker(close_timeout=1.0, signal_guard=False, drain_availability=False)
    calls: list[str] = []
    exit_raised = False
    escalating = False

    def _handle_exit(sig: int, frame: FrameType | None) -> None:
        nonlocal exit_raised
        if escalating:
            calls.append("raise")
            return
        if exit_raised:
            calls.append("os._exit")
            return
        exit_raised = True
        calls.append("schedule")

    _handle_exit.__module__ = CLI_MODULE
    _handle_exit.__qualname__ = "_run_worker.<locals>._handle_exit"
    signal.signal(signal.SIGTERM, _handle_exit)
    signal.raise_signal(signal.SIGTERM)
    assert calls == ["schedule"] and sc.forced_end_reason() is None
    signal.raise_signal(signal.SIGTERM)
    assert calls == ["schedule"] and sc.forced_end_reason() == f"{sc.FORCED_REASON_PREFIX} (second SIGTERM)"
    signal.raise_signal(signal.SIGTERM)
    assert calls == ["schedule", "os._exit"]
