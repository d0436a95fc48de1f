"""In-process tests of livekit_safeclose.worker: the signal tap, the guard, drain availability
(installed with ``livekit_safeclose.install()`` and only the parts a test is about).

The CLI handler is faked with a function whose ``__module__`` is livekit-agents' CLI module,
which is how the tap recognises it; signals are real (``signal.raise_signal`` runs the Python
handler before it returns).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pytest
from aiohttp.web_runner import GracefulExit
from livekit.agents.ipc import supervised_proc
from livekit.agents.job import JobRequest
from livekit.agents.worker import AgentServer
from livekit.protocol import agent

import livekit_safeclose as lsc
from livekit_safeclose import worker as sc

CLI_MODULE = "livekit.agents.cli.cli"
SAFECLOSE_LOGGER = "livekit.agents.safeclose"


def _guard() -> None:
    """The signal guard alone (the tap comes with it)."""
    lsc.install(drain_availability=False, bounded_drain_end=False)


def _availability(*, reject_late_accepts: bool = True) -> None:
    """Drain availability alone (the tap comes with it)."""
    lsc.install(signal_guard=False, bounded_drain_end=False, reject_late_accepts=reject_late_accepts)


@dataclass
class FakeCli:
    """Stands in for ``_run_worker``'s handlers; ``calls`` records (name, signum, when)."""

    calls: list[tuple[str, int, float]] = field(default_factory=list)
    on_call: Callable[[int], None] | None = None

    def handler(self, name: str = "_handle_exit") -> Callable[[int, FrameType | None], None]:
        def _handler(signum: int, frame: FrameType | None) -> None:
            self.calls.append((name, signum, time.monotonic()))
            if self.on_call is not None:
                self.on_call(signum)

        _handler.__module__ = CLI_MODULE
        _handler.__qualname__ = f"_run_worker.<locals>.{name}"
        return _handler

    def install(self, name: str = "_handle_exit") -> None:
        h = self.handler(name)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, h)

    def count(self, name: str = "_handle_exit") -> int:
        return sum(1 for c in self.calls if c[0] == name)


@pytest.fixture
def cli() -> Iterator[FakeCli]:
    """Restores the process's SIGINT/SIGTERM handlers and removes both patches afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield FakeCli()
    finally:
        lsc.uninstall()
        for sig, h in saved.items():
            signal.signal(sig, h)


def _raise(sig: int = signal.SIGTERM) -> None:
    assert callable(signal.getsignal(sig)), "no Python handler: the signal would kill pytest"
    signal.raise_signal(sig)


def _safeclose_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SAFECLOSE_LOGGER and r.levelname == "WARNING"]


# -- install / uninstall -------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_install_is_idempotent_and_uninstall_restores_originals(cli: FakeCli) -> None:
    import asyncio.unix_events as unix_events

    loop_cls = unix_events._UnixSelectorEventLoop
    originals = {
        "signal.signal": signal.signal,
        "add_signal_handler": vars(loop_cls)["add_signal_handler"],
        "_is_available": vars(AgentServer)["_is_available"],
        "_update_worker_status": vars(AgentServer)["_update_worker_status"],
        "accept": vars(JobRequest)["accept"],
    }

    def current() -> dict[str, Any]:
        return {
            "signal.signal": signal.signal,
            "add_signal_handler": vars(loop_cls)["add_signal_handler"],
            "_is_available": vars(AgentServer)["_is_available"],
            "_update_worker_status": vars(AgentServer)["_update_worker_status"],
            "accept": vars(JobRequest)["accept"],
        }

    for _ in range(2):
        lsc.install(bounded_drain_end=False)
    patched = current()
    assert all(patched[k] is not originals[k] for k in originals)
    lsc.install(bounded_drain_end=False)
    assert current() == patched  # a second install changes nothing

    _availability()  # the guard off, drain availability on
    assert vars(loop_cls)["add_signal_handler"] is originals["add_signal_handler"]
    assert signal.signal is patched["signal.signal"]  # still tapped for drain availability
    for _ in range(2):
        lsc.uninstall()
    assert all(current()[k] is originals[k] for k in originals)


def _refusals(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"the {part} part is not supported" in r.getMessage()]


@pytest.mark.timeout(10)
def test_missing_upstream_shape_refuses_the_part_and_patches_nothing(
    cli: FakeCli, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from livekit.agents.cli import cli as lk_cli

    original_signal = signal.signal
    monkeypatch.delattr(AgentServer, "_is_available")
    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        _availability()
    refused = _refusals(caplog, "drain_availability")
    assert len(refused) == 1 and re.search(r"AgentServer\._is_available", refused[0]), refused
    assert signal.signal is original_signal
    assert "accept" in vars(JobRequest) and not hasattr(vars(JobRequest)["accept"], "__wrapped__")
    lsc.uninstall()
    monkeypatch.undo()

    caplog.clear()
    monkeypatch.delattr(lk_cli, "_run_worker")
    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        _guard()
    refused = _refusals(caplog, "signal_guard")
    assert len(refused) == 1 and re.search(r"livekit\.agents\.cli\.cli\._run_worker", refused[0]), refused
    assert signal.signal is original_signal


# -- the signal guard: signal.signal ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_user_signal_handler_runs_and_cli_still_drains(
    cli: FakeCli, caplog: pytest.LogCaptureFixture
) -> None:
    _guard()  # at import time, before the CLI: nothing armed yet
    cli.install()
    user_calls: list[int] = []

    def user_handler(signum: int, frame: FrameType | None) -> None:
        user_calls.append(signum)

    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        previous = signal.signal(signal.SIGTERM, user_handler)
    assert callable(previous) and previous is not user_handler
    assert signal.getsignal(signal.SIGTERM) is not user_handler  # the CLI stays in charge

    _raise()
    assert cli.count() == 1 and user_calls == [signal.SIGTERM]
    assert sc.drain_requested()
    warnings = _safeclose_warnings(caplog)
    assert len(warnings) == 1 and "user_handler" in warnings[0] and "SIGTERM" in warnings[0]

    # the CLI moves to its force-exit handler for the second signal: the tap follows it
    cli.install("_force_exit")
    _raise()
    assert cli.count("_handle_exit") == 1 and cli.count("_force_exit") == 1
    assert user_calls == [signal.SIGTERM, signal.SIGTERM]


@pytest.mark.timeout(10)
def test_user_chaining_to_previous_handler_calls_cli_once(cli: FakeCli) -> None:
    _guard()
    cli.install()
    previous: Any = None

    def chaining(signum: int, frame: FrameType | None) -> None:
        previous(signum, frame)  # the classic "call the old handler too"

    previous = signal.signal(signal.SIGTERM, chaining)
    _raise()
    assert cli.count() == 1  # twice would mean "second signal: exit now" upstream

    # restoring what we were handed is a user "uninstall": no user handler afterwards
    signal.signal(signal.SIGTERM, previous)
    _raise()
    assert cli.count() == 2


@pytest.mark.asyncio
@pytest.mark.timeout(10)
@pytest.mark.parametrize("exc", [SystemExit(0), GracefulExit(), KeyboardInterrupt()])
async def test_user_handler_raising_cannot_skip_the_drain(
    cli: FakeCli, caplog: pytest.LogCaptureFixture, exc: BaseException
) -> None:
    _guard()
    cli.install()

    def raising(signum: int, frame: FrameType | None) -> None:
        raise exc

    signal.signal(signal.SIGTERM, raising)
    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        _raise()  # does not raise
        for _ in range(3):  # the WARNING is logged on the loop, not in the signal handler
            await asyncio.sleep(0)
    assert cli.count() == 1
    assert any(type(exc).__name__ in w for w in _safeclose_warnings(caplog))


@pytest.mark.timeout(10)
def test_cli_escalation_raise_still_propagates(cli: FakeCli) -> None:
    """Upstream's blocked-loop escalation raises ``_ExitCli`` from its handler: keep that."""

    class ExitCli(SystemExit):
        pass

    def escalate(signum: int) -> None:
        raise ExitCli()

    _guard()
    cli.install()
    signal.signal(signal.SIGTERM, lambda s, f: None)
    cli.on_call = escalate
    with pytest.raises(ExitCli):
        _raise()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("disposition", [signal.SIG_DFL, signal.SIG_IGN])
def test_user_default_or_ignore_keeps_the_drain(cli: FakeCli, disposition: signal.Handlers) -> None:
    _guard()
    cli.install()
    signal.signal(signal.SIGTERM, disposition)
    _raise()  # SIG_DFL would have killed this process
    assert cli.count() == 1


@pytest.mark.timeout(10)
def test_not_armed_before_the_cli_and_armed_when_installed_late(cli: FakeCli) -> None:
    _guard()

    def early(signum: int, frame: FrameType | None) -> None:
        pass

    # import time / prewarm: upstream semantics, the CLI will replace it anyway
    signal.signal(signal.SIGTERM, early)
    assert signal.getsignal(signal.SIGTERM) is early
    lsc.uninstall()

    cli.install()  # the CLI runs first, the guard comes later (e.g. from request_fnc)
    _guard()
    signal.signal(signal.SIGTERM, early)
    _raise()
    assert cli.count() == 1


@pytest.mark.timeout(10)
def test_uninstall_hands_over_what_upstream_would_have_installed(cli: FakeCli) -> None:
    _guard()
    cli.install()
    sigint_cli = signal.getsignal(signal.SIGINT)

    def user(signum: int, frame: FrameType | None) -> None:
        pass

    signal.signal(signal.SIGTERM, user)
    lsc.uninstall()
    assert signal.getsignal(signal.SIGTERM) is user  # the user's replacement, as upstream
    assert getattr(signal.getsignal(signal.SIGINT), "__module__", "") == CLI_MODULE
    assert signal.getsignal(signal.SIGINT) is not sigint_cli  # the CLI's own function again


@pytest.mark.timeout(10)
def test_framework_sigint_mask_passes_through(cli: FakeCli) -> None:
    """``supervised_proc._mask_ctrl_c`` ignores SIGINT around process spawns and restores it."""
    _guard()
    cli.install()
    tapped = signal.getsignal(signal.SIGINT)
    with supervised_proc._mask_ctrl_c():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is tapped
    _raise(signal.SIGINT)
    assert cli.count() == 1


# -- the signal guard: loop.add_signal_handler -------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_loop_signal_handler_runs_and_cli_still_drains(
    cli: FakeCli, caplog: pytest.LogCaptureFixture
) -> None:
    _guard()
    cli.install()
    loop = asyncio.get_running_loop()
    called = asyncio.Event()

    def on_sigterm() -> None:
        called.set()

    with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        assert getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "_sighandler_noop"
        _raise()
        await asyncio.wait_for(called.wait(), 2)  # delivered through set_wakeup_fd
        assert cli.count() == 1
        warnings = _safeclose_warnings(caplog)
        assert len(warnings) == 1 and "on_sigterm" in warnings[0]
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    assert getattr(signal.getsignal(signal.SIGTERM), "__module__", "") == "livekit_safeclose.worker.signals"


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_loop_callback_raising_graceful_exit_does_not_stop_the_loop(
    cli: FakeCli, caplog: pytest.LogCaptureFixture
) -> None:
    _guard()
    cli.install()
    loop = asyncio.get_running_loop()

    def raise_graceful_exit() -> None:  # what aiohttp's AppRunner(handle_signals=True) installs
        raise GracefulExit()

    loop.add_signal_handler(signal.SIGTERM, raise_graceful_exit)
    try:
        with caplog.at_level("WARNING", logger=SAFECLOSE_LOGGER):
            _raise()
            await asyncio.sleep(0.2)  # upstream: GracefulExit would escape run_until_complete
        assert cli.count() == 1
        assert any("GracefulExit" in w for w in _safeclose_warnings(caplog))
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_signal_during_blocked_loop_runs_cli_at_once_and_drain_when_loop_resumes(
    cli: FakeCli,
) -> None:
    """CPython runs a ``signal.signal`` handler on the main thread as soon as the blocking call
    returns EINTR (``time.sleep`` resumes afterwards), so the CLI handler and the drain intent
    are immediate; what the CLI schedules with ``call_soon_threadsafe`` waits for the loop."""
    _guard()
    loop = asyncio.get_running_loop()
    scheduled: list[float] = []

    def schedule_exit(signum: int) -> None:  # what upstream's _handle_exit does
        loop.call_soon_threadsafe(lambda: scheduled.append(time.monotonic()))

    cli.on_call = schedule_exit
    cli.install()
    # a process-directed signal (what an orchestrator sends) is delivered to the main thread,
    # interrupting its sleep; raise_signal() from this thread would wait for the sleep to end
    killer = threading.Timer(0.1, os.kill, args=(os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    killer.start()
    time.sleep(0.6)  # user code blocking the event loop
    unblocked = time.monotonic()
    assert cli.count() == 1 and cli.calls[0][2] - start < 0.5
    assert sc.drain_requested()
    assert not scheduled
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert scheduled and scheduled[0] >= unblocked


# -- drain availability --------------------------------------------------------------------------


def _bare_server() -> tuple[AgentServer, list[agent.WorkerMessage]]:
    """An AgentServer with just what _is_available/_update_worker_status read (never run)."""
    server = AgentServer(load_threshold=math.inf)
    sent: list[agent.WorkerMessage] = []

    async def _queue_msg(msg: agent.WorkerMessage) -> None:
        sent.append(msg)

    s: Any = server
    s._devmode = False
    s._worker_load = 0.0
    s._reserved_slots = 0
    s._previous_status = agent.WorkerStatus.WS_AVAILABLE
    s._proc_pool = type("Pool", (), {"processes": []})()
    s._queue_msg = _queue_msg
    return server, sent


def _job_request() -> tuple[JobRequest, list[str]]:
    events: list[str] = []

    async def on_reject(terminate: bool) -> None:
        events.append(f"reject terminate={terminate}")

    async def on_accept(args: Any) -> None:
        events.append("accept")

    return JobRequest(job=agent.Job(id="AJ_x"), on_reject=on_reject, on_accept=on_accept), events


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_drain_availability_from_the_signal_not_from_drain(cli: FakeCli) -> None:
    server, sent = _bare_server()
    assert server._is_available()
    _availability()
    cli.install()
    assert server._is_available()
    await server._update_worker_status()
    assert sent[-1].update_worker.status == agent.WorkerStatus.WS_AVAILABLE

    _raise()  # upstream only stops answering "available" once drain() sets _draining
    assert not server.draining
    assert not server._is_available()
    await server._update_worker_status()
    assert sent[-1].update_worker.status == agent.WorkerStatus.WS_FULL

    req, events = _job_request()
    await req.accept()  # request_fnc accepting after the drain began
    assert events == ["reject terminate=False"]


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_late_accept_rejection_follows_programmatic_drain_and_can_be_disabled(
    cli: FakeCli,
) -> None:
    server, _ = _bare_server()
    _availability()
    server._is_available()  # the worker is seen answering availability
    req, events = _job_request()
    await req.accept()
    assert events == ["accept"]

    s: Any = server
    s._draining = True  # AgentServer.drain() called directly, no signal
    req, events = _job_request()
    await req.accept()
    assert events == ["reject terminate=False"]

    _availability(reject_late_accepts=False)
    req, events = _job_request()
    await req.accept()
    assert events == ["accept"]
