"""Regression tests for the worker defects found in review (each failed before its fix).

* the OS-level signal handler logged and started the exit watchdog thread itself;
* the exit watchdog was never cancelled and the forced-end state never reset: a process that
  goes on after the worker returned was ``os._exit(1)``-ed ~16 s later, and a later drain
  raised ``TimeoutError`` at once;
* a second SIGTERM/SIGINT no longer exited at once (upstream's documented contract);
* exceptions swallowed without a trace (the kill, the leftovers, the audit, a user handler).

The CLI's ``_run_worker`` runs for real here, in this process, with the server's
``run``/``drain``/``aclose`` mocked (as upstream's own tests do), so the signal handlers it
installs are the real ones.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, SimpleNamespace
from typing import Any
from unittest.mock import AsyncMock, patch

import pytest
from livekit.agents import job as lk_job
from livekit.agents.cli import cli as lk_cli
from livekit.agents.cli.proto import CliArgs
from livekit.agents.worker import AgentServer

import livekit_safeclose as lsc
from livekit_safeclose import worker as sc
from livekit_safeclose.options import Options
from livekit_safeclose.worker import bounds, drain_end, job_shutdown

SAFECLOSE_LOGGER = "livekit.agents.safeclose"
CLI_MODULE = "livekit.agents.cli.cli"
WATCHDOG_NAME = "safeclose-exit-watchdog"


@pytest.fixture
def handlers() -> Iterator[None]:
    """The process's SIGINT/SIGTERM handlers and event loop are restored after the test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        lsc.uninstall()
        for sig, h in saved.items():
            signal.signal(sig, h)
        asyncio.set_event_loop(None)


@pytest.fixture
def no_exit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``os._exit`` records instead of ending pytest."""
    calls: list[int] = []
    monkeypatch.setattr(os, "_exit", calls.append)
    return calls


@pytest.fixture
def fast_bounds(monkeypatch: pytest.MonkeyPatch) -> float:
    """Bounds small enough that a forgotten watchdog fires within the test; its delay."""
    monkeypatch.setattr(bounds, "SESSION_GUARD_MARGIN", 0.0)
    monkeypatch.setattr(bounds, "FORCED_END_GRACE", 0.0)
    monkeypatch.setattr(bounds, "PROC_EXIT_SLACK", 0.1)
    monkeypatch.setattr(bounds, "WATCHDOG_SLACK", 0.1)
    return 0.2 + 0.1 + 0.1  # proc_close_bound(close_timeout=0.2) + WATCHDOG_SLACK


def _run_cli_worker(monkeypatch: pytest.MonkeyPatch, during_drain: Callable[[], Any]) -> None:
    """The CLI's ``_run_worker`` for real, in this process: ``server.run`` returns at once, so
    the CLI installs its exit-now handlers and drains; ``during_drain`` runs inside the drain."""
    monkeypatch.setattr(lk_cli, "setup_logging", lambda *a, **k: None)  # keep pytest's logging
    server = AgentServer()
    args = CliArgs(log_level="ERROR", url=None, api_key=None, api_secret=None)
    with (
        patch.object(server, "run", new_callable=AsyncMock),
        patch.object(server, "drain", new_callable=AsyncMock, side_effect=during_drain),
        patch.object(server, "aclose", new_callable=AsyncMock),
    ):
        lk_cli._run_worker(server, args)


def _watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WATCHDOG_NAME and t.is_alive()]


# -- the OS-level signal handler only sets flags ----------------------------------------------


class _InHandler(logging.Handler):
    """Records, for every log record, whether the OS-level signal handler was on the stack."""

    def __init__(self, handler_code: Any) -> None:
        super().__init__(logging.DEBUG)
        self.handler_code = handler_code
        self.inside: list[tuple[str, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.inside.append((record.getMessage(), _on_stack(self.handler_code)))


def _on_stack(code: Any) -> bool:
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _fake_cli(name: str, calls: list[str]) -> Callable[[int, FrameType | None], None]:
    """A stand-in for one of the CLI's ``_run_worker`` handlers (module and closure the tap
    reads); it records instead of scheduling or exiting."""
    escalating = False

    def _handler(sig: int, frame: FrameType | None) -> None:
        nonlocal escalating
        if escalating:
            escalating = False
        calls.append(name)

    _handler.__module__ = CLI_MODULE
    _handler.__qualname__ = f"_run_worker.<locals>.{name}"
    _handler.__code__ = _handler.__code__.replace(co_name=name)
    return _handler


@pytest.mark.asyncio
@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", ["user_handler_raises", "second_signal"])
async def test_the_signal_handler_neither_logs_nor_starts_a_thread(
    handlers: None, no_exit: list[int], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    lsc.install(drain_timeout=0.5, close_timeout=1.0, force_close_on_second_signal=True)
    calls: list[str] = []
    signal.signal(signal.SIGTERM, _fake_cli("_handle_exit", calls))
    os_handler = signal.getsignal(signal.SIGTERM)
    code = getattr(os_handler, "__code__", None)
    assert code is not None, os_handler
    if case == "user_handler_raises":

        def raising(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(3)

        signal.signal(signal.SIGTERM, raising)
    else:
        signal.signal(signal.SIGTERM, _fake_cli("_force_exit", calls))  # the CLI's exit-now handler
    recorder = _InHandler(code)
    logging.getLogger(SAFECLOSE_LOGGER).addHandler(recorder)
    started: list[bool] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(_on_stack(code))
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        signal.raise_signal(signal.SIGTERM)
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        logging.getLogger(SAFECLOSE_LOGGER).removeHandler(recorder)
        monkeypatch.undo()
    assert recorder.inside, "nothing was logged"
    assert not any(inside for _, inside in recorder.inside), recorder.inside
    assert not any(started), "a thread was started inside the signal handler"
    if case == "second_signal":
        assert started and _watchdogs(), "the exit watchdog was not started"
    lsc.uninstall()  # stops the watchdog


# -- the watchdog and the forced-end state end with the worker's shutdown ---------------------


@pytest.mark.timeout(30)
def test_the_watchdog_is_cancelled_when_the_cli_worker_run_returns(
    handlers: None, no_exit: list[int], fast_bounds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    lsc.install(drain_timeout=0.1, close_timeout=0.2, force_close_on_second_signal=True)
    seen: list[list[threading.Thread]] = []

    async def second_signal_during_drain(*args: Any, **kwargs: Any) -> None:
        signal.raise_signal(signal.SIGTERM)  # the CLI's _force_exit is installed by now
        await asyncio.sleep(0.05)  # the loop runs what the handler handed over
        seen.append(_watchdogs())

    _run_cli_worker(monkeypatch, second_signal_during_drain)
    assert seen and seen[0], "the second signal started no exit watchdog"
    time.sleep(fast_bounds + 0.6)  # past the watchdog's delay: it would have called os._exit(1)
    assert no_exit == [] and not _watchdogs()
    assert sc.forced_end_reason() is None  # and the forced-end state is reset


class _StuckProc:
    running_job = True

    async def join(self) -> None:
        await asyncio.Event().wait()


def _bare_server(*procs: Any) -> AgentServer:
    """An AgentServer never run: what ``drain()`` and ``aclose()`` read, nothing else."""
    server = AgentServer()
    s: Any = server
    s._draining = False
    s._lock = asyncio.Lock()
    s._job_lifecycle_tasks = set()
    s._close_future = None  # set by run(): its aclose() returns at once
    s._proc_pool = SimpleNamespace(processes=list(procs))
    s._update_worker_status = AsyncMock()
    return server


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_a_later_drain_starts_fresh_once_the_worker_closed(handlers: None) -> None:
    lsc.install(drain_timeout=0.1, close_timeout=0.5)
    first = _bare_server(_StuckProc())
    with pytest.raises(asyncio.TimeoutError):
        await first.drain(timeout=0.2)  # type: ignore[arg-type]
    assert sc.forced_end_reason() is not None
    await first.aclose()  # the worker's shutdown completed

    second = _bare_server()  # another worker in the same process (a test suite, an embedded worker)
    t0 = time.monotonic()
    await second.drain(timeout=0.2)  # type: ignore[arg-type]  # must not raise TimeoutError at once
    assert time.monotonic() - t0 < 1.0 and sc.forced_end_reason() is None


# -- a second signal exits at once unless asked otherwise ----------------------------------------


@pytest.mark.timeout(30)
def test_a_second_signal_exits_at_once_by_default(
    handlers: None, no_exit: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream's contract (its tests/test_drain_timeout.py): a SIGTERM during the drain calls
    ``os._exit(1)``. The layer's default keeps it."""
    lsc.install()

    async def signal_while_draining(*args: Any, **kwargs: Any) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)

    _run_cli_worker(monkeypatch, signal_while_draining)
    assert no_exit == [1]
    assert sc.forced_end_reason() is None


# -- nothing is swallowed without a trace ---------------------------------------------------------


class _Proc:
    """The parts of a SupervisedProc the bounded close touches; its kill fails."""

    def __init__(self) -> None:
        self.started = True
        self._closing = True
        self.running_job = None
        self.pid = 4343

    async def kill(self) -> None:
        raise RuntimeError("kill failed on purpose")


def _traced(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if needle in r.getMessage() and r.exc_info is not None]


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_a_failed_kill_is_logged_with_its_traceback(
    handlers: None, fast_bounds: float, caplog: pytest.LogCaptureFixture
) -> None:
    lsc.install(drain_timeout=0.1, close_timeout=0.2)

    async def never_ends(self: Any) -> None:
        await asyncio.Event().wait()

    aclose = drain_end.wrap_proc_aclose(never_ends, Options())
    drain_end.force_end("drain timed out")
    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        await aclose(_Proc())
    assert _traced(caplog, "4343"), [r.getMessage() for r in caplog.records]


class _Session:
    async def aclose(self) -> None:
        pass


@pytest.mark.asyncio
@pytest.mark.timeout(20)
@pytest.mark.parametrize("broken", ["leftovers", "audit"])
async def test_a_failed_leftovers_snapshot_or_audit_is_logged_with_its_traceback(
    handlers: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    lsc.install(drain_timeout=0.5, close_timeout=1.0)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{broken} broken on purpose")

    async def upstream_shutdown_job(self: Any, job_entry_task: Any, shutdown_info: Any) -> None:
        if broken == "leftovers":
            monkeypatch.setattr(threading, "enumerate", boom)
        else:
            monkeypatch.setattr(importlib.import_module("livekit_safeclose.audit"), "closing_of", boom)

    shutdown_job = job_shutdown.wrap_shutdown_job(upstream_shutdown_job, Options())
    lk_job._JobContextVar.set(SimpleNamespace(primary_session=_Session(), job=SimpleNamespace(id="AJ_9")))  # type: ignore[arg-type]
    entry = asyncio.ensure_future(asyncio.sleep(0))
    with caplog.at_level("DEBUG", logger=SAFECLOSE_LOGGER):
        await shutdown_job(
            SimpleNamespace(_session_end_timeout=1.0), entry, SimpleNamespace(reason="job done")
        )
    monkeypatch.undo()
    traced = [
        r for r in caplog.records if r.exc_info is not None and f"{broken} broken" in str(r.exc_info[1])
    ]
    assert traced and all(r.levelno >= logging.WARNING for r in traced), [
        r.getMessage() for r in caplog.records
    ]


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_a_user_handler_exception_is_logged_with_its_traceback(
    handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    lsc.install(drain_availability=False, bounded_drain_end=False)
    calls: list[str] = []
    signal.signal(signal.SIGTERM, _fake_cli("_handle_exit", calls))

    def raising(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(3)

    signal.signal(signal.SIGTERM, raising)
    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        signal.raise_signal(signal.SIGTERM)
        for _ in range(3):
            await asyncio.sleep(0)
    assert calls == ["_handle_exit"]
    records = [r for r in caplog.records if "raised SystemExit" in r.getMessage()]
    assert records and records[0].exc_info is not None and records[0].exc_info[0] is SystemExit
