"""In-process tests of the worker parts of ``livekit_safeclose.install()`` / ``uninstall()`` and
the bounded end of drain's pieces (the drain, the job-process close, the job side's shutdown),
with upstream's internals faked where a real worker would be needed (each replacement is made
by its patch-table factory around a fake original); the real thing runs in
test_worker_bounded_end.py."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, SimpleNamespace
from typing import Any

import pytest
from livekit.agents import job as lk_job
from livekit.agents.cli import cli as lk_cli
from livekit.agents.ipc import channel, job_proc_lazy_main, supervised_proc
from livekit.agents.job import JobRequest
from livekit.agents.worker import AgentServer

import livekit_safeclose as lsc
from livekit_safeclose import worker as sc
from livekit_safeclose.options import Options
from livekit_safeclose.worker import bounds, drain_end, job_shutdown, signals

CLI_MODULE = "livekit.agents.cli.cli"


def _snapshot() -> dict[str, Any]:
    import asyncio.unix_events as unix_events

    return {
        "drain": AgentServer.__dict__.get("drain"),
        "_is_available": AgentServer.__dict__.get("_is_available"),
        "_update_worker_status": AgentServer.__dict__.get("_update_worker_status"),
        "accept": JobRequest.__dict__.get("accept"),
        "aclose": supervised_proc.SupervisedProc.__dict__.get("aclose"),
        "_shutdown_job": job_proc_lazy_main._JobProc.__dict__.get("_shutdown_job"),
        "server_aclose": AgentServer.__dict__.get("aclose"),
        "_run_worker": lk_cli._run_worker,
        "guard": job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT,
        "signal.signal": signal.signal,
        "add_signal_handler": unix_events._UnixSelectorEventLoop.__dict__.get("add_signal_handler"),
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
        lsc.uninstall()
        for sig, key in ((signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint")):
            signal.signal(sig, before[key])
        assert _snapshot() == before


WORKER_KEYS = (
    "drain",
    "_is_available",
    "_update_worker_status",
    "accept",
    "aclose",
    "_shutdown_job",
    "server_aclose",
)


@pytest.mark.timeout(20)
def test_install_worker_patches_and_restores_exactly(clean: dict[str, Any]) -> None:
    lsc.install(drain_timeout=1.0, close_timeout=3.0)
    assert sc.worker_installed() == {
        "signal_guard": True,
        "drain_availability": True,
        "bounded_drain_end": True,
        "bounded_teardown": True,
        "force_close_on_second_signal": False,  # opt-in
    }
    now = _snapshot()
    for key in WORKER_KEYS:
        assert now[key] is not clean[key], key
        assert now[key].__wrapped__ is clean[key], key
        assert now[key].__doc__ == clean[key].__doc__, key
    assert now["_run_worker"].__wrapped__ is clean["_run_worker"]
    assert now["signal.signal"] is not clean["signal.signal"]
    assert now["add_signal_handler"] is not clean["add_signal_handler"]
    assert clean["guard"] == 60.0 and now["guard"] == 3.0 + bounds.SESSION_GUARD_MARGIN
    assert now["guard"].__wrapped__ == 60.0
    assert now["sigterm"] is clean["sigterm"]  # nothing armed: the CLI never ran here

    lsc.install(drain_timeout=1.0, close_timeout=5.0)  # idempotent: same functions, new bound
    again = _snapshot()
    remade = ("guard", "_run_worker")  # refresh rows: remade from the original for the new options
    assert {k: v for k, v in again.items() if k not in remade} == {
        k: v for k, v in now.items() if k not in remade
    }
    assert again["_run_worker"].__wrapped__ is clean["_run_worker"]
    opts = lsc.installed_options()
    assert (
        again["guard"] == 5.0 + bounds.SESSION_GUARD_MARGIN and opts is not None and opts.close_timeout == 5.0
    )

    lsc.uninstall()
    assert _snapshot() == clean
    assert sc.worker_installed() == dict.fromkeys(
        (
            "signal_guard",
            "drain_availability",
            "bounded_drain_end",
            "bounded_teardown",
            "force_close_on_second_signal",
        ),
        False,
    )
    lsc.uninstall()  # no-op
    assert _snapshot() == clean


@pytest.mark.timeout(20)
def test_flags_opt_out_each_part(clean: dict[str, Any]) -> None:
    lsc.install(drain_timeout=1.0, close_timeout=2.0, signal_guard=False, drain_availability=False)
    now = _snapshot()
    for key in ("_is_available", "_update_worker_status", "accept", "add_signal_handler"):
        assert now[key] is clean[key], key
    assert now["drain"] is not clean["drain"] and now["guard"] == 3.0

    lsc.install(drain_timeout=1.0, close_timeout=2.0, bounded_drain_end=False, reject_late_accepts=False)
    now = _snapshot()
    for key in ("drain", "aclose", "guard", "server_aclose", "_run_worker"):
        assert now[key] == clean[key], key
    # the job's shutdown stays wrapped: bounded_teardown shares the row
    assert now["_shutdown_job"].__wrapped__ is clean["_shutdown_job"]
    assert (
        now["_is_available"] is not clean["_is_available"]
        and now["add_signal_handler"] is not clean["add_signal_handler"]
    )
    opts = lsc.installed_options()
    assert opts is not None and opts.reject_late_accepts is False

    lsc.install(
        drain_timeout=1.0,
        close_timeout=2.0,
        signal_guard=False,
        drain_availability=False,
        bounded_drain_end=False,
        bounded_teardown=False,
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
        lsc.install(drain_timeout=0.1, close_timeout=bad)
    assert _snapshot() == clean


@pytest.mark.timeout(20)
def test_incompatible_release_refuses_the_part_and_patches_none_of_it(
    clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker part whose internals are missing is refused by name in one WARNING, nothing of
    it is patched, and the rest installs (the session close included)."""
    monkeypatch.delattr(job_proc_lazy_main._JobProc, "_shutdown_job")
    with caplog.at_level("WARNING", logger="livekit.agents.safeclose"):
        lsc.install(drain_timeout=1.0, close_timeout=2.0)
    refused = [
        r.getMessage() for r in caplog.records if "bounded_drain_end part is not supported" in r.getMessage()
    ]
    assert len(refused) == 1 and re.search(r"_JobProc\._shutdown_job", refused[0]), refused
    assert not sc.worker_installed()["bounded_drain_end"]
    now = _snapshot()
    for key in ("drain", "aclose", "server_aclose", "_run_worker", "guard"):
        assert now[key] == clean[key], key
    assert sc.worker_installed()["signal_guard"] and sc.worker_installed()["drain_availability"]
    assert {"core", "stream_ledger"} <= lsc.installed_parts()
    lsc.uninstall()
    monkeypatch.undo()
    assert _snapshot() == clean

    # the CLI's exit-now closures are only needed with force_close_on_second_signal
    monkeypatch.setattr(lk_cli, "_run_worker", lambda server, args: None)  # no _force_exit inside
    caplog.clear()
    with caplog.at_level("WARNING", logger="livekit.agents.safeclose"):
        lsc.install(drain_timeout=1.0, close_timeout=2.0)
    assert sc.worker_installed()["bounded_drain_end"] and not caplog.records
    assert not drain_end.second_signal_closes()
    with caplog.at_level("WARNING", logger="livekit.agents.safeclose"):
        lsc.install(drain_timeout=1.0, close_timeout=2.0, force_close_on_second_signal=True)
    named = [r.getMessage() for r in caplog.records if "force_close_on_second_signal" in r.getMessage()]
    assert len(named) == 1 and "_force_exit" in named[0] and "_handle_exit" in named[0], named
    assert sc.worker_installed()["bounded_drain_end"] and not drain_end.second_signal_closes()


@pytest.mark.timeout(20)
def test_harmless_in_a_process_without_worker(clean: dict[str, Any]) -> None:
    threads = set(threading.enumerate())
    t0 = time.perf_counter()
    lsc.install(drain_timeout=1.0, close_timeout=2.0)
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


async def _loop_turns(n: int = 3) -> None:
    """Let the loop run what the signal handler handed over (logging, the watchdog)."""
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_second_signal_forces_the_end_once(
    clean: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    lsc.install(
        drain_timeout=0.5,
        close_timeout=1.0,
        signal_guard=False,
        drain_availability=False,
        force_close_on_second_signal=True,
    )
    force_exit, set_escalating, calls = _cli_handlers()
    signal.signal(signal.SIGTERM, force_exit)  # the CLI switching to its exit-now handler
    assert signal.getsignal(signal.SIGTERM) is signals.dispatch

    set_escalating(True)  # the CLI watchdog's re-signal of a blocked loop: not an operator's
    signal.raise_signal(signal.SIGTERM)
    assert calls == ["stray"] and sc.forced_end_reason() is None

    signal.raise_signal(signal.SIGTERM)  # the second signal: force the end instead of exiting
    assert calls == ["stray"]
    assert sc.forced_end_reason() == f"{sc.FORCED_REASON_PREFIX} (second SIGTERM)"
    await _loop_turns()  # the WARNING and the watchdog run on the loop, not in the handler
    assert drain_end._end.watchdog is not None and drain_end._end.watchdog.is_alive()
    assert any("second SIGTERM during shutdown" in r.getMessage() for r in caplog.records)

    signal.raise_signal(signal.SIGTERM)  # a third one: the CLI's exit at once
    assert calls == ["stray", "exit"]
    watchdog = drain_end._end.watchdog
    lsc.uninstall()  # cancels the exit watchdog
    watchdog.join(1)
    assert not watchdog.is_alive() and sc.forced_end_reason() is None


# -- the drain --------------------------------------------------------------------------------------


class _Server:
    active_jobs = ["J1"]


def _replacement(factory: Callable[[Any, Options], Any], fake_upstream: Any) -> Any:
    """What the patch-table factory makes around ``fake_upstream`` (the options in force are
    read at call time, so ``install()`` still decides the bounds)."""
    made = factory(fake_upstream, Options())
    assert made.__wrapped__ is fake_upstream
    return made


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_drain_outcomes(clean: dict[str, Any]) -> None:
    lsc.install(drain_timeout=0.5, close_timeout=1.0)

    async def finishes(self: Any, timeout: Any = None) -> None:
        await asyncio.sleep(0.01)

    await _replacement(drain_end.wrap_drain, finishes)(_Server())
    assert sc.forced_end_reason() is None  # a drain that finishes is never forced

    async def times_out(self: Any, timeout: Any = None) -> None:
        await asyncio.sleep(0.01)
        raise asyncio.TimeoutError

    with pytest.raises(asyncio.TimeoutError):
        await _replacement(drain_end.wrap_drain, times_out)(_Server())
    assert sc.forced_end_reason() == f"{sc.FORCED_REASON_PREFIX} (drain timed out)"


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_drain_ended_by_second_signal(clean: dict[str, Any]) -> None:
    lsc.install(drain_timeout=0.5, close_timeout=1.0)
    cancelled = asyncio.Event()

    async def long_drain(self: Any, timeout: Any = None) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    drain = _replacement(drain_end.wrap_drain, long_drain)
    loop = asyncio.get_running_loop()
    # from another thread, like a signal handler would: wakes the drain through the loop
    threading.Timer(0.2, lambda: drain_end.force_end_from_signal("second SIGTERM")).start()
    t0 = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await drain(_Server())
    assert loop.time() - t0 < 2.0 and cancelled.is_set()
    with pytest.raises(asyncio.TimeoutError):  # a drain started after the signal ends at once
        await drain(_Server())


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
    monkeypatch.setattr(bounds, "SESSION_GUARD_MARGIN", 0.0)
    monkeypatch.setattr(bounds, "FORCED_END_GRACE", 0.0)
    monkeypatch.setattr(bounds, "PROC_EXIT_SLACK", 0.1)


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
    lsc.install(drain_timeout=0.1, close_timeout=0.2)
    proc = _Proc(asyncio.get_running_loop())

    async def upstream_aclose(self: _Proc) -> None:
        self.events.append(f"upstream(sent={len(sent)})")
        self._closing = True
        await self.exited  # waits for ShuttingDown / the exit: no bound upstream

    aclose = _replacement(drain_end.wrap_proc_aclose, upstream_aclose)
    drain_end.force_end("drain timed out")
    t0 = time.monotonic()
    await aclose(proc)
    elapsed = time.monotonic() - t0
    assert [m.reason for m in sent] == [f"{sc.FORCED_REASON_PREFIX} (drain timed out)"]
    assert proc.events == ["upstream(sent=1)", "kill"]  # the reason went before upstream's request
    assert sc.proc_close_bound(0.2) <= elapsed < sc.proc_close_bound(0.2) + 1.0


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_proc_close_unforced_is_upstream_and_escalates(
    clean: dict[str, Any], monkeypatch: pytest.MonkeyPatch, fast_bound: None, sent: list[Any]
) -> None:
    lsc.install(drain_timeout=0.1, close_timeout=0.2)
    loop = asyncio.get_running_loop()

    async def upstream_aclose(self: _Proc) -> None:
        self.events.append("upstream")
        await self.exited

    aclose = _replacement(drain_end.wrap_proc_aclose, upstream_aclose)
    quick = _Proc(loop)
    loop.call_later(0.05, quick.exited.set_result, None)
    await aclose(quick)
    assert quick.events == ["upstream"] and sent == []

    idle = _Proc(loop, running=False)  # an idle process in a forced end: no reason, still bounded
    slow = _Proc(loop)
    closes = [asyncio.ensure_future(aclose(p)) for p in (idle, slow)]
    await asyncio.sleep(0.2)
    assert not any(c.done() for c in closes)
    slow._closing = True  # upstream's request already went out: the job is in its own shutdown
    drain_end.force_end_from_signal("second SIGTERM")
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
    """A ``_JobProc`` whose job (upstream's job context variable, read through the public
    ``get_job_context()``) has ``session`` as its primary session."""
    ctx = SimpleNamespace(primary_session=session, job=SimpleNamespace(id="AJ_7"))
    lk_job._JobContextVar.set(ctx)  # type: ignore[arg-type]
    return SimpleNamespace(_session_end_timeout=300.0)


async def _user_background_loop() -> None:
    await asyncio.Event().wait()


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_job_shutdown_forced_reason(clean: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    lsc.install(drain_timeout=1.0, close_timeout=2.0)
    caplog.set_level("INFO", logger="livekit.agents.safeclose")
    calls: list[tuple[str, float]] = []

    async def upstream_shutdown_job(self: Any, entry: asyncio.Task[None], info: Any) -> None:
        calls.append((info.reason, time.monotonic()))

    shutdown_job = _replacement(job_shutdown.wrap_shutdown_job, upstream_shutdown_job)
    session = _Session()
    job = _job(session)
    entry = asyncio.ensure_future(asyncio.sleep(60))  # an entrypoint still running
    background = asyncio.ensure_future(_user_background_loop())
    reason = f"{sc.FORCED_REASON_PREFIX} (drain timed out)"
    try:
        await shutdown_job(job, entry, SimpleNamespace(reason=reason))
    finally:
        background.cancel()
    assert session.closed_at is not None and calls and session.closed_at <= calls[0][1]
    assert entry.cancelled()  # not the 15 s upstream wait
    assert job._session_end_timeout == bounds.FORCED_END_GRACE
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
    await shutdown_job(job2, entry2, SimpleNamespace(reason="job done"))
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
        # the same report from the package's command
        cmd = [
            sys.executable,
            "-m",
            "livekit_safeclose",
            "idle-report",
            "--pid",
            str(os.getpid()),
            "--interval",
            "0.1",
        ]
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=15, check=True).stdout
        assert text.startswith(f"worker {os.getpid()}:") and str(child.pid) in text, text
    finally:
        child.kill()
        child.wait(5)


@pytest.mark.timeout(20)
def test_second_signal_before_the_drain_started(clean: dict[str, Any]) -> None:
    """The CLI's first handler, ``_handle_exit``, called again before the CLI switched to
    ``_force_exit`` (the loop had not served the first exit yet): also forced, not exited."""
    lsc.install(
        drain_timeout=0.5,
        close_timeout=1.0,
        signal_guard=False,
        drain_availability=False,
        force_close_on_second_signal=True,
    )
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
