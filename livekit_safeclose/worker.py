"""Worker-lifecycle patches for livekit-agents 1.8.x: keep SIGTERM meaning "drain".

livekit-agents' CLI (``livekit.agents.cli.cli._run_worker``) installs its SIGTERM/SIGINT handler
with ``signal.signal``; the first call of that handler schedules the drain, a second call means
"exit now" (``os._exit(1)``). Two upstream gaps break deploys:

* any later ``signal.signal(SIGTERM, h)`` or ``loop.add_signal_handler(SIGTERM, h)`` made in the
  worker's main process (in ``request_fnc``, a ``worker_started`` hook, a library such as
  aiohttp's ``AppRunner``) silently replaces the CLI handler, so SIGTERM never drains the worker;
  a replacement that raises ``SystemExit`` (``sys.exit``, aiohttp's ``GracefulExit``) skips the
  drain: the dispatch connection closes at once, running jobs are shut down or orphaned, and
  the process can linger until its children exit on their own;
* ``AgentServer`` only becomes unavailable when ``drain()`` sets ``_draining``, which happens a
  few loop iterations after the signal, or only after a blocked loop resumes; a job offered in
  that window is accepted, and so is any request whose ``request_fnc`` answers after the
  signal; each keeps the old worker alive for a whole job.

:func:`install_signal_guard` keeps the CLI handler in charge: user handlers still run, once per
signal, after it. :func:`install_drain_availability` makes the worker unavailable (reports
``WS_FULL``, answers ``available=False``) from the moment the signal is delivered. Both can be
called at import time of the agent file, before the CLI runs: they wait for the CLI to install
its handler and take effect then. Both are idempotent and fully reversible.

A third gap is the end of a drain that runs out. When ``--drain-timeout`` expires (or a second
signal arrives), upstream shuts the remaining jobs down without a bound: the supervisor waits
for each job's ``ShuttingDown`` with no timeout, the job waits 15 s for its entrypoint and up to
``_SESSION_ACLOSE_TIMEOUT = 60`` s for ``session.aclose()`` (a second signal skips all of it with
``os._exit(1)``, dropping every provider connection with the process).
:func:`install_bounded_drain_end` makes that end bounded and complete: every running job gets a
``ShutdownRequest`` whose reason its job process recognises, closes its session at once with the
layer's forced close (bounded by ``close_timeout``, so provider streams say goodbye), and a job
process that still has not ended ``close_timeout`` + a few seconds later is killed. A drain that
finishes in time is never cut.

:func:`install_worker` installs all of it (each part opt-out-able); :func:`idle_report` shows
what keeps a worker busy once its sessions ended (idle prewarmed processes, their memory and
CPU); ``python -m livekit_safeclose.worker idle-report --pid PID`` prints it from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from .compat import IncompatibleLivekitAgents

__all__ = [
    "FORCED_REASON_PREFIX",
    "IdleReport",
    "JobLeftovers",
    "ProcInfo",
    "aidle_report",
    "drain_requested",
    "forced_end_reason",
    "idle_report",
    "install_bounded_drain_end",
    "install_drain_availability",
    "install_signal_guard",
    "install_worker",
    "job_leftovers",
    "proc_close_bound",
    "uninstall_bounded_drain_end",
    "uninstall_drain_availability",
    "uninstall_signal_guard",
    "uninstall_worker",
    "worker_installed",
]

logger = logging.getLogger("livekit.agents.safeclose")

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_HANDLED_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
# modules whose functions are the CLI's own SIGTERM/SIGINT handlers (run, force-exit, final)
_CLI_MODULES = ("livekit.agents.cli.cli", "livekit.agents.cli._legacy")
_FRAMEWORK_PREFIX = "livekit.agents."
_ASYNCIO_UNIX_MODULE = "asyncio.unix_events"


@dataclass
class _TapState:
    """Process-wide state of the ``signal.signal`` tap shared by both patches."""

    guard: bool = False
    drain_intent: bool = False
    bounded_end: bool = False
    original_signal: Callable[..., Any] | None = None
    original_add_signal_handler: Callable[..., Any] | None = None
    original_is_available: Callable[..., Any] | None = None
    original_update_worker_status: Callable[..., Any] | None = None
    original_accept: Callable[..., Any] | None = None
    reject_late_accepts: bool = True
    # the CLI's current handler per signal; a signal is "armed" once it has one
    cli: dict[int, _Handler] = field(default_factory=dict)
    # what user code last asked for, per signal (guard only); None = no user handler
    user: dict[int, _Handler] = field(default_factory=dict)
    drain_requested_at: float | None = None
    # per-delivery bookkeeping, so one signal calls the CLI handler at most once
    delivering: int = 0
    cli_called: bool = False
    cli_exc: BaseException | None = None


_state = _TapState()
_lock = threading.RLock()
# AgentServer instances seen by the patched methods, so JobRequest.accept can see `_draining`
_servers: weakref.WeakSet[Any] = weakref.WeakSet()


# -- helpers ------------------------------------------------------------------------------------


def _describe(handler: object) -> str:
    if handler is None:
        return "None"
    if isinstance(handler, int) and not callable(handler):
        for name in ("SIG_DFL", "SIG_IGN"):
            if handler == getattr(signal, name):
                return f"signal.{name}"
        return repr(handler)
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return repr(handler)


def _is_cli_handler(handler: object) -> bool:
    module = getattr(handler, "__module__", None) or ""
    return callable(handler) and module in _CLI_MODULES


def _caller_module(depth: int = 2) -> str:
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return ""
    return str(frame.f_globals.get("__name__", ""))


def _sig_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def drain_requested() -> bool:
    """True once SIGTERM/SIGINT reached the CLI's handler in this process (through the tap)."""
    return _state.drain_requested_at is not None


def _tap_wanted() -> bool:
    return _state.guard or _state.drain_intent or _state.bounded_end


def _draining_now() -> bool:
    return drain_requested() or any(getattr(s, "_draining", False) for s in list(_servers))


# -- the dispatcher: the OS-level handler while a patch is active -------------------------------


def _call_cli(signum: int, frame: FrameType | None) -> None:
    cli = _state.cli.get(signum)
    _state.cli_called = True
    if callable(cli):
        if _state.bounded_end and _end.signals == 0 and _is_exit_now_signal(cli):
            # the CLI would os._exit(1) here, dropping every job's provider connections:
            # force-close the running sessions instead, bounded; a third signal exits at once
            _end.signals += 1
            _begin_forced_end(f"second {_sig_name(signum)}", from_signal=True)
            return
        try:
            cli(signum, frame)
        except BaseException as e:  # the CLI's own raise (_ExitCli escalation): must propagate
            _state.cli_exc = e
            raise


def _dispatch(signum: int, frame: FrameType | None) -> None:
    """Installed with ``signal.signal`` in place of the CLI handler once the CLI set it.

    Calls the CLI handler exactly once (the drain), then the user's replacement, if any. The
    CLI goes first so a user handler that blocks or raises cannot delay or skip the drain.
    """
    if _state.drain_requested_at is None:
        _state.drain_requested_at = time.monotonic()
    outer_called = _state.cli_called
    _state.delivering += 1
    _state.cli_called = False
    try:
        _call_cli(signum, frame)
        user = _state.user.get(signum) if _state.guard else None
        if callable(user):
            try:
                user(signum, frame)
            except BaseException as e:
                if e is _state.cli_exc:  # a nested signal's CLI raise passing through
                    raise
                logger.warning(
                    "user %s handler %s raised %s; ignored so the worker keeps draining",
                    _sig_name(signum),
                    _describe(user),
                    type(e).__name__,
                )
    finally:
        _state.delivering -= 1
        _state.cli_called = outer_called


class _CliProxy:
    """Handed to user code as the "previous handler", so chaining to it is safe.

    Inside a delivery the CLI handler already ran (calling it again would mean "second signal,
    exit now"), so the proxy does nothing there; called outside a delivery it forwards.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if _state.delivering and _state.cli_called:
            return
        cli = _state.cli.get(self.signum)
        if callable(cli):
            cli(signum, frame)

    def __repr__(self) -> str:
        return f"<livekit-agents CLI {_sig_name(self.signum)} handler (safeclose proxy)>"


def _wrap_loop_callback(sig: int, callback: Callable[..., Any]) -> Callable[..., Any]:
    """Keep a loop signal callback from ending the worker loop by raising SystemExit."""

    def _safeclose_loop_signal_callback(*args: Any) -> None:
        try:
            callback(*args)
        except (SystemExit, KeyboardInterrupt) as e:
            logger.warning(
                "loop %s callback %s raised %s; ignored so the worker keeps draining",
                _sig_name(sig),
                _describe(callback),
                type(e).__name__,
            )

    _safeclose_loop_signal_callback.__wrapped__ = callback  # type: ignore[attr-defined]
    return _safeclose_loop_signal_callback


# -- the tap: patched signal.signal --------------------------------------------------------------


def _tap_signal(signalnum: int, handler: _Handler) -> _Handler:
    """Replacement for ``signal.signal`` while a patch is installed."""
    orig = _state.original_signal
    assert orig is not None
    sig = int(signalnum)
    with _lock:
        if sig not in _HANDLED_SIGNALS or not _tap_wanted():
            return orig(signalnum, handler)  # type: ignore[no-any-return]

        if handler is _dispatch:  # a framework restore (e.g. _mask_ctrl_c) of our dispatcher
            return orig(signalnum, handler)  # type: ignore[no-any-return]

        if _is_cli_handler(handler):  # the CLI (re)setting its handler: arm / follow it
            _state.cli[sig] = handler
            return orig(signalnum, _dispatch)  # type: ignore[no-any-return]

        if sig not in _state.cli:  # not armed yet: the CLI's handler will win anyway
            return orig(signalnum, handler)  # type: ignore[no-any-return]

        caller = _caller_module()
        if caller.startswith(_FRAMEWORK_PREFIX):  # e.g. _mask_ctrl_c's SIG_IGN around spawns
            return orig(signalnum, handler)  # type: ignore[no-any-return]

        if not _state.guard:  # drain-intent only: user replacements keep upstream semantics
            return orig(signalnum, handler)  # type: ignore[no-any-return]

        current = signal.getsignal(sig)
        if caller == _ASYNCIO_UNIX_MODULE:
            # loop.add/remove_signal_handler bookkeeping: the callback is delivered through
            # set_wakeup_fd whatever Python-level handler is installed, so keep ours
            return current

        if isinstance(handler, _CliProxy):  # the user restoring what we handed out
            previous = _state.user.get(sig)
            _state.user[sig] = None
            if current is not signal.SIG_IGN:
                orig(signalnum, _dispatch)
            return previous if previous is not None else handler

        previous = _state.user.get(sig)
        _state.user[sig] = handler if callable(handler) else None
        logger.warning(
            "%s tried to replace the livekit-agents %s handler; kept the worker's drain "
            "and will run it after the drain starts",
            _describe(handler),
            _sig_name(sig),
            extra={"caller": caller},
        )
        if current is not signal.SIG_IGN:  # SIG_IGN = framework mask; its restore re-arms
            orig(signalnum, _dispatch)
        return previous if previous is not None else _CliProxy(sig)


def _tap_install() -> None:
    if _state.original_signal is not None:
        return
    _state.original_signal = signal.signal
    signal.signal = _tap_signal
    # the CLI may already be running (called from request_fnc or a worker_started hook)
    for sig in _HANDLED_SIGNALS:
        current = signal.getsignal(sig)
        if _is_cli_handler(current):
            _state.cli[sig] = current
            _state.original_signal(sig, _dispatch)


def _tap_uninstall() -> None:
    orig = _state.original_signal
    if orig is None:
        return
    signal.signal = orig
    _state.original_signal = None
    for sig, cli in _state.cli.items():
        if signal.getsignal(sig) is _dispatch:
            user = _state.user.get(sig)
            # what upstream would have installed: the last handler asked for
            orig(sig, user if user is not None else cli)
    _state.cli.clear()
    _state.user.clear()
    _state.drain_requested_at = None


def _tap_refresh_after_guard_off() -> None:
    """Guard off, tap stays (drain intent): user handlers get upstream semantics back."""
    orig = _state.original_signal
    if orig is None:
        return
    for sig, user in list(_state.user.items()):
        if user is not None and signal.getsignal(sig) is _dispatch:
            orig(sig, user)
            _state.cli.pop(sig, None)
    _state.user.clear()


# -- shape checks ---------------------------------------------------------------------------------


def _require(obj: object, attr: str, what: str) -> Any:
    value = getattr(obj, attr, None)
    if value is None:
        raise IncompatibleLivekitAgents(
            f"livekit_safeclose.worker: {what} is missing from the installed livekit-agents; "
            "this patch supports livekit-agents 1.8.x"
        )
    return value


def _require_own(cls: type, attr: str, what: str) -> Any:
    """Like :func:`_require`, but the class must define ``attr`` itself: restoring an inherited
    attribute with ``setattr`` would leave a copy on the subclass, not the original state."""
    value = vars(cls).get(attr)
    if value is None:
        raise IncompatibleLivekitAgents(
            f"livekit_safeclose.worker: {what} is missing from the installed livekit-agents; "
            "this patch supports livekit-agents 1.8.x"
        )
    return value


def _check_cli_shape() -> None:
    try:
        from livekit.agents.cli import cli as lk_cli
    except ImportError as e:
        raise IncompatibleLivekitAgents(
            "livekit_safeclose.worker: livekit.agents.cli.cli is missing "
            "(the CLI whose SIGTERM handler this patch protects)"
        ) from e
    _require(lk_cli, "_run_worker", "livekit.agents.cli.cli._run_worker")
    if lk_cli.__name__ not in _CLI_MODULES:
        raise IncompatibleLivekitAgents(f"livekit_safeclose.worker: unexpected CLI module {lk_cli.__name__}")


# -- public API: signal guard ----------------------------------------------------------------------


def install_signal_guard() -> None:
    """Keep livekit-agents' CLI SIGTERM/SIGINT handler in charge in the worker main process.

    Patches ``signal.signal`` (module attribute) and, on Unix,
    ``asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler``. Once the CLI has
    installed its handler (``livekit.agents.cli.cli._run_worker``), a later
    ``signal.signal(SIGTERM|SIGINT, h)`` from user code records ``h`` instead of replacing the
    CLI handler, and ``loop.add_signal_handler`` no longer displaces it (its callback still runs,
    delivered through ``signal.set_wakeup_fd``). Each signal calls the CLI handler exactly once,
    then the user's handler; a user handler or loop callback raising ``SystemExit`` /
    ``KeyboardInterrupt`` (e.g. aiohttp's ``GracefulExit``) is logged and ignored, so the drain
    is never skipped. One WARNING names each handler that tried to take over. Before the CLI
    runs (import time, ``prewarm``, job processes) nothing changes. Idempotent.
    """
    with _lock:
        if _state.guard:
            return
        _check_cli_shape()
        add_orig: Callable[..., Any] | None = None
        if sys.platform != "win32":
            import asyncio.unix_events as unix_events

            loop_cls = _require(
                unix_events, "_UnixSelectorEventLoop", "asyncio.unix_events._UnixSelectorEventLoop"
            )
            add_orig = _require_own(
                loop_cls,
                "add_signal_handler",
                "asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler",
            )
            _require(unix_events, "_sighandler_noop", "asyncio.unix_events._sighandler_noop")

            def add_signal_handler(
                self: asyncio.AbstractEventLoop,
                sig: int,
                callback: Callable[..., Any],
                *args: Any,
            ) -> None:
                if _state.guard and int(sig) in _HANDLED_SIGNALS and int(sig) in _state.cli:
                    logger.warning(
                        "%s tried to replace the livekit-agents %s handler via "
                        "loop.add_signal_handler; kept the worker's drain and will run it too",
                        _describe(callback),
                        _sig_name(int(sig)),
                    )
                    callback = _wrap_loop_callback(int(sig), callback)
                assert add_orig is not None
                add_orig(self, sig, callback, *args)

            add_signal_handler.__doc__ = add_orig.__doc__
            add_signal_handler.__wrapped__ = add_orig  # type: ignore[attr-defined]
            loop_cls.add_signal_handler = add_signal_handler
            _state.original_add_signal_handler = add_orig

        _state.guard = True
        _tap_install()


def uninstall_signal_guard() -> None:
    """Undo :func:`install_signal_guard`: restore the original functions, and hand each
    signal to the handler upstream would have left installed. Idempotent."""
    with _lock:
        if not _state.guard:
            return
        _state.guard = False
        if _state.original_add_signal_handler is not None:
            import asyncio.unix_events as unix_events

            loop_cls: Any = unix_events._UnixSelectorEventLoop
            loop_cls.add_signal_handler = _state.original_add_signal_handler
            _state.original_add_signal_handler = None
        if _tap_wanted():
            _tap_refresh_after_guard_off()
        else:
            _tap_uninstall()


# -- public API: draining means unavailable --------------------------------------------------------


def _agent_server_cls() -> Any:
    try:
        from livekit.agents.worker import AgentServer
    except ImportError as e:
        raise IncompatibleLivekitAgents(
            "livekit_safeclose.worker: livekit.agents.worker.AgentServer is missing"
        ) from e
    return AgentServer


def _job_request_cls() -> Any:
    try:
        from livekit.agents.job import JobRequest
    except ImportError as e:
        raise IncompatibleLivekitAgents(
            "livekit_safeclose.worker: livekit.agents.job.JobRequest is missing"
        ) from e
    return JobRequest


def install_drain_availability(*, reject_late_accepts: bool = True) -> None:
    """Make a worker unavailable from the moment SIGTERM/SIGINT reaches the CLI handler.

    Patches ``livekit.agents.worker.AgentServer._is_available`` (consulted by
    ``AgentServer._answer_availability`` once the load is refreshed) to answer False, and
    ``AgentServer._update_worker_status`` to report ``WS_FULL``, as soon as the signal is
    delivered rather than when ``AgentServer.drain()`` later sets ``_draining``: a job offered
    after SIGTERM is refused (``available=False``, ``terminate=False``, so the server offers it
    elsewhere) even if the signal arrived while user code blocked the loop.

    With ``reject_late_accepts`` (default) it also patches ``livekit.agents.job.JobRequest.accept``:
    a request that was still in ``request_fnc`` when the drain began is answered
    ``available=False, terminate=False`` instead of being accepted, because upstream would
    launch it and keep the old worker alive for that job's whole duration. Jobs already
    accepted (waiting for their assignment) or running are never touched.

    Also taps ``signal.signal`` like :func:`install_signal_guard` (to see the delivery) without
    changing what user replacements do. Idempotent; a second call updates the option.
    """
    with _lock:
        _state.reject_late_accepts = reject_late_accepts
        if _state.drain_intent:
            return
        _check_cli_shape()
        server_cls = _agent_server_cls()
        is_available = _require_own(server_cls, "_is_available", "AgentServer._is_available")
        update_status = _require_own(server_cls, "_update_worker_status", "AgentServer._update_worker_status")
        _require(server_cls, "_queue_msg", "AgentServer._queue_msg")
        _require(server_cls, "drain", "AgentServer.drain")
        job_request_cls = _job_request_cls()
        accept = _require_own(job_request_cls, "accept", "JobRequest.accept")
        reject = _require(job_request_cls, "reject", "JobRequest.reject")
        if "terminate" not in inspect.signature(reject).parameters:
            raise IncompatibleLivekitAgents(
                "livekit_safeclose.worker: JobRequest.reject(terminate=...) is missing from the "
                "installed livekit-agents; this patch supports livekit-agents 1.8.x"
            )
        from livekit.protocol import agent as agent_pb

        _require(agent_pb, "UpdateWorkerStatus", "livekit.protocol.agent.UpdateWorkerStatus")

        def _is_available(self: Any) -> bool:
            _servers.add(self)
            if drain_requested():
                return False
            return bool(is_available(self))

        async def _update_worker_status(self: Any) -> None:
            _servers.add(self)
            if drain_requested() and not getattr(self, "_draining", False):
                update = agent_pb.UpdateWorkerStatus(
                    status=agent_pb.WorkerStatus.WS_FULL, job_count=len(self.active_jobs)
                )
                try:
                    await self._queue_msg(agent_pb.WorkerMessage(update_worker=update))
                except Exception:  # channel closed while shutting down: nothing to report to
                    logger.debug("could not report WS_FULL", exc_info=True)
                return
            await update_status(self)

        async def _accept(self: Any, *args: Any, **kwargs: Any) -> None:
            if _state.reject_late_accepts and _draining_now():
                logger.info(
                    "worker is draining: job %s accepted after the drain began is answered "
                    "unavailable so the server can offer it elsewhere",
                    getattr(self, "id", "?"),
                )
                await self.reject(terminate=False)
                return
            await accept(self, *args, **kwargs)

        patched: tuple[tuple[Any, Any], ...] = (
            (_is_available, is_available),
            (_update_worker_status, update_status),
            (_accept, accept),
        )
        for fn, orig in patched:
            fn.__doc__ = orig.__doc__
            fn.__wrapped__ = orig
        server_cls._is_available = _is_available
        server_cls._update_worker_status = _update_worker_status
        job_request_cls.accept = _accept
        _state.original_is_available = is_available
        _state.original_update_worker_status = update_status
        _state.original_accept = accept
        _state.drain_intent = True
        _tap_install()


def uninstall_drain_availability() -> None:
    """Undo :func:`install_drain_availability` (restores ``AgentServer._is_available``,
    ``AgentServer._update_worker_status``, ``JobRequest.accept`` and, if the signal guard is not
    installed either, ``signal.signal``). Idempotent."""
    with _lock:
        if not _state.drain_intent:
            return
        server_cls = _agent_server_cls()
        if _state.original_is_available is not None:
            server_cls._is_available = _state.original_is_available
        if _state.original_update_worker_status is not None:
            server_cls._update_worker_status = _state.original_update_worker_status
        if _state.original_accept is not None:
            _job_request_cls().accept = _state.original_accept
        _state.original_is_available = None
        _state.original_update_worker_status = None
        _state.original_accept = None
        _servers.clear()
        _state.drain_intent = False
        _state.drain_requested_at = None
        if not _tap_wanted():
            _tap_uninstall()


# -- public API: bounded end of drain --------------------------------------------------------------

#: the ``ShutdownRequest`` reason (prefix) a job process reads as "force-close the session now"
FORCED_REASON_PREFIX = "safeclose: forced close"
#: upstream's job-side guard around ``session.aclose()`` (60 s) becomes close_timeout + this
SESSION_GUARD_MARGIN = 1.0
#: what a forced job gets after its session closed, for ``on_session_end`` and ``ShuttingDown``
FORCED_END_GRACE = 2.0
#: IPC and the process exit after that
PROC_EXIT_SLACK = 1.0
#: after a second signal, the worker exits at the latest this long after the processes' bound
WATCHDOG_SLACK = 2.0
#: how long a cancelled entrypoint gets to unwind in a forced job shutdown
ENTRYPOINT_UNWIND = 0.5


def proc_close_bound(close_timeout: float) -> float:
    """How long a job process may take to end once its forced shutdown began, before the
    supervisor kills it: the session close bound plus the job-side guard margin, the grace for
    ``on_session_end`` / ``ShuttingDown``, and the exit."""
    return close_timeout + SESSION_GUARD_MARGIN + FORCED_END_GRACE + PROC_EXIT_SLACK


@dataclass
class _EndState:
    """Process-wide state of the bounded end of drain."""

    close_timeout: float = 10.0
    reason: str | None = None
    at: float | None = None
    signals: int = 0
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)
    watchdog: threading.Timer | None = None
    original_drain: Callable[..., Any] | None = None
    original_proc_aclose: Callable[..., Any] | None = None
    original_shutdown_job: Callable[..., Any] | None = None
    original_session_guard: Any = None
    session_guard: float | None = None


_end = _EndState()


def forced_end_reason() -> str | None:
    """Why this process's drain was ended by force (``None`` while it was not): the reason the
    running jobs' ``ShutdownRequest`` carries, e.g. ``"safeclose: forced close (drain timed
    out)"``. Job processes see it as their shutdown reason."""
    return _end.reason


def _check_close_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"close_timeout must be a number of seconds, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"close_timeout must be finite and > 0, got {value!r}")
    return value


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _end_waiter() -> asyncio.Future[None]:
    """A future of the running loop, resolved when the end of the drain is forced."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    if _end.reason is not None:
        fut.set_result(None)
        return fut
    entry = (loop, fut)
    _end.waiters.append(entry)

    def _drop(_: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            _end.waiters.remove(entry)

    fut.add_done_callback(_drop)
    return fut


def _watchdog_exit(delay: float) -> None:
    logger.error("forced shutdown still running %.1fs after the second signal; exiting now", delay)
    os._exit(1)


def _begin_forced_end(why: str, *, from_signal: bool = False) -> None:
    """Force the end of the drain: wakes the drain and every job-process close (from any thread,
    including a signal handler). After a second signal, a watchdog exits the process if the
    bounded shutdown itself gets stuck (a blocked loop)."""
    if _end.reason is None:
        _end.reason = f"{FORCED_REASON_PREFIX} ({why})"
        _end.at = time.monotonic()
    for loop, fut in list(_end.waiters):
        with contextlib.suppress(RuntimeError):  # that loop is closed
            loop.call_soon_threadsafe(_resolve, fut)
    if from_signal:
        logger.warning(
            "%s during shutdown: force-closing the running jobs' sessions (bounded by "
            "close_timeout=%.1fs) before the worker exits; signal again to exit at once",
            why,
            _end.close_timeout,
        )
        if _end.watchdog is None:
            delay = proc_close_bound(_end.close_timeout) + WATCHDOG_SLACK
            timer = threading.Timer(delay, _watchdog_exit, args=(delay,))
            timer.daemon = True
            timer.name = "safeclose-exit-watchdog"
            _end.watchdog = timer
            timer.start()


def _cell(fn: Any, name: str) -> Any:
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None:
        return None
    for var, cell in zip(code.co_freevars, closure, strict=False):
        if var == name:
            try:
                return cell.cell_contents
            except ValueError:  # empty cell
                return None
    return None


def _is_exit_now_signal(handler: object) -> bool:
    """True when calling the CLI ``handler`` now means ``os._exit(1)``: ``_force_exit`` (a signal
    during the drain or the close), or ``_handle_exit`` for the second time. The CLI watchdog's
    re-signal of a blocked loop (``escalating``) is not an operator's signal: left alone."""
    if not _is_cli_handler(handler):
        return False
    code = getattr(handler, "__code__", None)
    if code is None or _cell(handler, "escalating"):
        return False
    if code.co_name == "_force_exit":
        return True
    return code.co_name == "_handle_exit" and bool(_cell(handler, "exit_raised"))


def _cli_handler_code(name: str) -> CodeType | None:
    from livekit.agents.cli import cli as lk_cli

    run = getattr(lk_cli, "_run_worker", None)
    for const in getattr(getattr(run, "__code__", None), "co_consts", ()):
        if isinstance(const, CodeType) and const.co_name == name:
            return const
    return None


def _check_exit_handlers_shape() -> None:
    for name, cells in (("_force_exit", {"escalating"}), ("_handle_exit", {"escalating", "exit_raised"})):
        code = _cli_handler_code(name)
        if code is None or not cells <= set(code.co_freevars):
            raise IncompatibleLivekitAgents(
                f"livekit_safeclose.worker: livekit.agents.cli.cli._run_worker.<locals>.{name} "
                f"(closing over {', '.join(sorted(cells))}) is missing from the installed "
                "livekit-agents; this patch supports livekit-agents 1.8.x"
            )


def _init_assigns(cls: type, attr: str) -> bool:
    init = inspect.unwrap(cls.__init__)  # type: ignore[misc]
    code = getattr(init, "__code__", None)
    return code is not None and attr in code.co_names


def _check_bounded_end_shape() -> tuple[Any, Any, Any, Any]:
    """The classes and the module the bounded end patches, after checking what it relies on."""
    _check_cli_shape()
    _check_exit_handlers_shape()
    server_cls = _agent_server_cls()
    _require_own(server_cls, "drain", "AgentServer.drain")
    _require(server_cls, "active_jobs", "AgentServer.active_jobs")
    try:
        from livekit.agents.ipc import channel, job_proc_lazy_main, proto, supervised_proc
        from livekit.agents.job import JobContext
        from livekit.agents.utils.aio import duplex_unix
    except ImportError as e:
        raise IncompatibleLivekitAgents(
            f"livekit_safeclose.worker: livekit.agents.ipc is not what this patch expects ({e}); "
            "it supports livekit-agents 1.8.x"
        ) from e
    proc_cls = _require(
        supervised_proc, "SupervisedProc", "livekit.agents.ipc.supervised_proc.SupervisedProc"
    )
    proc_aclose = _require_own(proc_cls, "aclose", "SupervisedProc.aclose")
    _require(proc_cls, "kill", "SupervisedProc.kill")
    _require(channel, "asend_message", "livekit.agents.ipc.channel.asend_message")
    _require(duplex_unix, "DuplexClosed", "livekit.agents.utils.aio.duplex_unix.DuplexClosed")
    for attr in ("_pch", "_shutting_down_fut"):
        if attr not in proc_aclose.__code__.co_names:
            raise IncompatibleLivekitAgents(
                f"livekit_safeclose.worker: SupervisedProc.aclose no longer uses {attr}; "
                "this patch supports livekit-agents 1.8.x"
            )
    request = _require(proto, "ShutdownRequest", "livekit.agents.ipc.proto.ShutdownRequest")
    if "reason" not in getattr(request, "__dataclass_fields__", {}):
        raise IncompatibleLivekitAgents(
            "livekit_safeclose.worker: ShutdownRequest(reason=...) is missing from the installed "
            "livekit-agents; this patch supports livekit-agents 1.8.x"
        )
    job_cls = _require(job_proc_lazy_main, "_JobProc", "livekit.agents.ipc.job_proc_lazy_main._JobProc")
    shutdown_job = _require_own(job_cls, "_shutdown_job", "_JobProc._shutdown_job")
    params = list(inspect.signature(shutdown_job).parameters)
    guard = getattr(job_proc_lazy_main, "_SESSION_ACLOSE_TIMEOUT", None)
    if (
        params[1:] != ["job_entry_task", "shutdown_info"]
        or not isinstance(guard, (int, float))
        or "_SESSION_ACLOSE_TIMEOUT" not in shutdown_job.__code__.co_names
        or not _init_assigns(job_cls, "_session_end_timeout")
        or not _init_assigns(JobContext, "_primary_agent_session")
    ):
        raise IncompatibleLivekitAgents(
            "livekit_safeclose.worker: _JobProc._shutdown_job(job_entry_task, shutdown_info), "
            "job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT, _JobProc._session_end_timeout or "
            "JobContext._primary_agent_session changed in the installed livekit-agents; this "
            "patch supports livekit-agents 1.8.x"
        )
    return server_cls, proc_cls, job_cls, job_proc_lazy_main


async def _send_forced_shutdown(proc: Any) -> None:
    """Tell a job process running a job why it is being shut down, before upstream's plain
    ``ShutdownRequest()``: its job side then force-closes the session at once."""
    if proc.__dict__.get("_safeclose_forced_sent") or getattr(proc, "running_job", None) is None:
        return
    init = getattr(proc, "_initialize_fut", None)
    if not proc.started or proc._closing or init is None or not init.done() or init.cancelled():
        return
    if init.exception() is not None:
        return
    from livekit.agents.ipc import channel, proto
    from livekit.agents.utils.aio import duplex_unix

    proc._safeclose_forced_sent = True
    with contextlib.suppress(duplex_unix.DuplexClosed, OSError):
        await channel.asend_message(
            proc._pch, proto.ShutdownRequest(reason=_end.reason or FORCED_REASON_PREFIX)
        )


async def _proc_aclose(self: Any) -> None:
    """``SupervisedProc.aclose`` with a bounded end once the drain is forced."""
    orig = _end.original_proc_aclose
    assert orig is not None
    if _end.reason is not None:
        await _send_forced_shutdown(self)
    waiter = _end_waiter()
    task = asyncio.ensure_future(orig(self))
    try:
        if _end.reason is None:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()  # type: ignore[no-any-return]
            await _send_forced_shutdown(self)
        bound = proc_close_bound(_end.close_timeout)
        await asyncio.wait({task}, timeout=bound)
        if not task.done():
            logger.warning(
                "job process %s did not end within %.1fs of its forced shutdown; killing it",
                getattr(self, "pid", "?"),
                bound,
                extra={"pid": getattr(self, "pid", None)},
            )
            with contextlib.suppress(Exception):
                await self.kill()
            await asyncio.wait({task}, timeout=PROC_EXIT_SLACK + 1.0)
            if not task.done():
                logger.error("job process %s: close still pending after the kill", getattr(self, "pid", "?"))
                return None
        return task.result()  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()


async def _drain(self: Any, *args: Any, **kwargs: Any) -> None:
    """``AgentServer.drain`` whose timeout (or a second signal) forces the end of the drain."""
    orig = _end.original_drain
    assert orig is not None
    _servers.add(self)
    if _end.reason is not None:  # a second signal came before the drain started
        raise asyncio.TimeoutError(_end.reason)
    waiter = _end_waiter()
    inner = asyncio.ensure_future(orig(self, *args, **kwargs))
    try:
        await asyncio.wait({inner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        inner.cancel()
        raise
    finally:
        waiter.cancel()
    jobs = len(getattr(self, "active_jobs", ()) or ())
    if inner.done():
        try:
            return inner.result()  # type: ignore[no-any-return]
        except asyncio.TimeoutError:
            _begin_forced_end("drain timed out")
            logger.warning(
                "drain timed out with %d job(s) still running: force-closing their sessions "
                "(bounded by close_timeout=%.1fs) before their processes end",
                jobs,
                _end.close_timeout,
            )
            raise
    inner.cancel()
    await asyncio.wait({inner}, timeout=1.0)
    logger.warning("drain ended early by a second signal with %d job(s) still running", jobs)
    raise asyncio.TimeoutError(_end.reason)


async def _forced_session_close(job: Any, job_entry_task: asyncio.Task[Any], reason: str) -> None:
    """Job side of a forced end: close the session now with the layer's forced close (bounded),
    do not wait 15 s for a running entrypoint, and cap ``on_session_end`` at FORCED_END_GRACE."""
    ctx = getattr(job, "_job_ctx", None)
    session = getattr(ctx, "_primary_agent_session", None)
    bound = _end.close_timeout + SESSION_GUARD_MARGIN
    logger.warning(
        "worker forced this job's shutdown (%s): closing the session now, bounded by close_timeout=%.1fs",
        reason,
        _end.close_timeout,
        extra={"safeclose_forced_reason": reason},
    )
    if session is not None:
        closer = asyncio.ensure_future(session.aclose())
        await asyncio.wait({closer}, timeout=bound)
        if not closer.done():
            logger.error(
                "session close did not return within %.1fs; is livekit_safeclose.install() called "
                "in the agent file?",
                bound,
            )
        elif not closer.cancelled() and closer.exception() is not None:
            logger.warning("session close raised %r", closer.exception())
    if not job_entry_task.done():  # it had the session close to finish on its own
        job_entry_task.cancel()
        await asyncio.wait({job_entry_task}, timeout=ENTRYPOINT_UNWIND)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        job._session_end_timeout = min(float(job._session_end_timeout), FORCED_END_GRACE)


async def _shutdown_job(self: Any, job_entry_task: asyncio.Task[Any], shutdown_info: Any) -> None:
    """``_JobProc._shutdown_job``: a forced reason closes the session first, bounded; every
    shutdown ends with a log of what the job process still runs (:func:`job_leftovers`)."""
    orig = _end.original_shutdown_job
    assert orig is not None
    reason = str(getattr(shutdown_info, "reason", "") or "")
    try:
        if reason.startswith(FORCED_REASON_PREFIX):
            await _forced_session_close(self, job_entry_task, reason)
        await orig(self, job_entry_task, shutdown_info)
    finally:
        with contextlib.suppress(Exception):
            _log_leftovers(self, reason)


def install_bounded_drain_end(*, close_timeout: float) -> None:
    """Bound the end of a drain that runs out, and close every running session first.

    Patches ``livekit.agents.worker.AgentServer.drain``: when its ``wait_for`` times out
    (worker.py ``drain``; the CLI then logs "drain timed out" and calls ``aclose``), or when a
    second SIGTERM/SIGINT arrives during the drain, the end is *forced*. Patches
    ``livekit.agents.ipc.supervised_proc.SupervisedProc.aclose``: in a forced end each process
    running a job first gets ``ShutdownRequest(reason="safeclose: forced close (...)")``, and a
    process that has not ended :func:`proc_close_bound` seconds later is killed (upstream waits
    for ``ShuttingDown`` without a bound). Patches
    ``livekit.agents.ipc.job_proc_lazy_main._JobProc._shutdown_job`` (job side): that reason
    closes the session at once with ``session.aclose()`` (the layer's forced close, bounded by
    ``close_timeout``, so provider streams say goodbye), cancels a still-running entrypoint
    instead of waiting 15 s for it, and caps ``on_session_end`` at :data:`FORCED_END_GRACE`;
    every job shutdown then logs what the job process still runs. Sets
    ``job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT`` (60 s upstream) to ``close_timeout +``
    :data:`SESSION_GUARD_MARGIN`. Through the signal tap, the CLI's exit-now handler
    (``_run_worker.<locals>._force_exit``) no longer ``os._exit(1)``s on the second signal: the
    drain ends forced instead (a watchdog exits if that takes longer than
    :func:`proc_close_bound` + :data:`WATCHDOG_SLACK`); a third signal exits at once.

    A drain that finishes within ``--drain-timeout`` is never cut. Call it in the agent file, so
    it also runs in every job process. Idempotent; a second call updates ``close_timeout``.
    """
    ct = _check_close_timeout(close_timeout)
    with _lock:
        guard = ct + SESSION_GUARD_MARGIN
        if _state.bounded_end:
            _end.close_timeout = ct
            _end.session_guard = guard
            from livekit.agents.ipc import job_proc_lazy_main

            job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT = guard
            return
        server_cls, proc_cls, job_cls, jplm = _check_bounded_end_shape()
        originals: tuple[tuple[Any, str, Any], ...] = (
            (server_cls, "drain", _drain),
            (proc_cls, "aclose", _proc_aclose),
            (job_cls, "_shutdown_job", _shutdown_job),
        )
        _end.original_drain = vars(server_cls)["drain"]
        _end.original_proc_aclose = vars(proc_cls)["aclose"]
        _end.original_shutdown_job = vars(job_cls)["_shutdown_job"]
        for owner, name, fn in originals:
            orig = vars(owner)[name]
            fn.__doc__ = orig.__doc__
            fn.__wrapped__ = orig
            setattr(owner, name, fn)
        _end.original_session_guard = jplm._SESSION_ACLOSE_TIMEOUT
        jplm._SESSION_ACLOSE_TIMEOUT = guard
        _end.session_guard = guard
        _end.close_timeout = ct
        _state.bounded_end = True
        _tap_install()


def uninstall_bounded_drain_end() -> None:
    """Undo :func:`install_bounded_drain_end`: restores ``AgentServer.drain``,
    ``SupervisedProc.aclose``, ``_JobProc._shutdown_job`` and ``_SESSION_ACLOSE_TIMEOUT`` (unless
    something else changed it since), stops a pending exit watchdog. Idempotent."""
    with _lock:
        if not _state.bounded_end:
            return
        server_cls = _agent_server_cls()
        from livekit.agents.ipc import job_proc_lazy_main as jplm
        from livekit.agents.ipc import supervised_proc

        for owner, name, orig in (
            (server_cls, "drain", _end.original_drain),
            (supervised_proc.SupervisedProc, "aclose", _end.original_proc_aclose),
            (jplm._JobProc, "_shutdown_job", _end.original_shutdown_job),
        ):
            if orig is not None:
                setattr(owner, name, orig)
        if jplm._SESSION_ACLOSE_TIMEOUT == _end.session_guard:
            jplm._SESSION_ACLOSE_TIMEOUT = _end.original_session_guard
        if _end.watchdog is not None:
            _end.watchdog.cancel()
        for _loop, fut in list(_end.waiters):
            with contextlib.suppress(RuntimeError):
                _loop.call_soon_threadsafe(fut.cancel)
        fresh = _EndState()
        for f in fields(fresh):
            setattr(_end, f.name, getattr(fresh, f.name))
        _state.bounded_end = False
        if not _tap_wanted():
            _tap_uninstall()


# -- public API: everything ------------------------------------------------------------------------


def install_worker(
    *,
    close_timeout: float,
    signal_guard: bool = True,
    drain_availability: bool = True,
    bounded_drain_end: bool = True,
    reject_late_accepts: bool = True,
) -> None:
    """Install the worker-lifecycle patches chosen by the flags, and remove the others.

    ``signal_guard``: :func:`install_signal_guard` (patches ``signal.signal`` and
    ``asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler``); ``drain_availability``
    (with ``reject_late_accepts``): :func:`install_drain_availability` (patches
    ``AgentServer._is_available``, ``AgentServer._update_worker_status``,
    ``JobRequest.accept``); ``bounded_drain_end``: :func:`install_bounded_drain_end` with
    ``close_timeout``, the layer's close bound (patches ``AgentServer.drain``,
    ``SupervisedProc.aclose``, ``_JobProc._shutdown_job``,
    ``job_proc_lazy_main._SESSION_ACLOSE_TIMEOUT`` and, through the signal tap, takes over the
    CLI's second-signal ``os._exit``). Cheap and
    inert in a process that never runs a worker: it patches classes and ``signal.signal``, starts
    nothing, and each part only acts once the livekit-agents CLI / job machinery runs. Raises
    :class:`~livekit_safeclose.IncompatibleLivekitAgents` (nothing newly installed stays
    installed) when the installed release lacks what a chosen part relies on. Idempotent; calling
    it again applies the new flags and ``close_timeout``.
    """
    ct = _check_close_timeout(close_timeout)
    with _lock:
        undo: list[Callable[[], None]] = []
        try:
            if signal_guard and not _state.guard:
                install_signal_guard()
                undo.append(uninstall_signal_guard)
            if drain_availability:
                was = _state.drain_intent
                install_drain_availability(reject_late_accepts=reject_late_accepts)
                if not was:
                    undo.append(uninstall_drain_availability)
            if bounded_drain_end:
                was = _state.bounded_end
                install_bounded_drain_end(close_timeout=ct)
                if not was:
                    undo.append(uninstall_bounded_drain_end)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        if not signal_guard:
            uninstall_signal_guard()
        if not drain_availability:
            uninstall_drain_availability()
        if not bounded_drain_end:
            uninstall_bounded_drain_end()


def uninstall_worker() -> None:
    """Undo :func:`install_worker` (every part; exact restore). Idempotent."""
    with _lock:
        uninstall_bounded_drain_end()
        uninstall_drain_availability()
        uninstall_signal_guard()


def worker_installed() -> dict[str, bool]:
    """Which worker parts are installed in this process."""
    return {
        "signal_guard": _state.guard,
        "drain_availability": _state.drain_intent,
        "bounded_drain_end": _state.bounded_end,
    }


# -- what a job process still runs when its shutdown ends -------------------------------------------

#: task modules that are the job process's own machinery (IPC, logging, telemetry, the loop)
_INFRA_MODULES = (
    "asyncio",
    "livekit.agents.ipc",
    "livekit.agents.utils",
    "livekit.agents.telemetry",
    "livekit.agents.cli",
    "livekit.rtc",
    "opentelemetry",
)
_MAX_LISTED = 20


@dataclass
class JobLeftovers:
    """What a job process still runs at the end of its shutdown sequence (session closed,
    ``on_session_end``, ``ShuttingDown``, room disconnect and shutdown callbacks done).

    In the process executor these die with the process a moment later; they are what the close
    did not stop, and what would keep running in the thread executor. ``tasks``: asyncio tasks
    outside the process's own machinery (name, owner module, the line each is parked on);
    ``infra_tasks``: how many of the machinery's tasks are alive (IPC, pings, logging);
    ``threads``: other live threads; ``streams``: provider streams still open (the layer's
    ledger); ``session``: the post-close audit of the job's primary session, if not clean."""

    job_id: str
    reason: str
    tasks: list[dict[str, str]] = field(default_factory=list)
    infra_tasks: int = 0
    threads: list[str] = field(default_factory=list)
    streams: dict[str, int] = field(default_factory=dict)
    session: str = ""

    @property
    def clean(self) -> bool:
        return not self.tasks and not self.streams.get("total", 0) and not self.session

    def summary(self) -> str:
        head = (
            f"job {self.job_id} shutdown done ({self.reason or '-'}): {len(self.tasks)} task(s) still "
            f"running outside the process machinery ({self.infra_tasks} machinery tasks), "
            f"{len(self.threads)} other thread(s), open streams {self.streams or {}}"
        )
        lines = [head]
        lines += [f"  - {t['name']} [{t['module']}] parked at {t['parked_at']}" for t in self.tasks]
        if self.threads:
            lines.append("  threads: " + ", ".join(self.threads))
        if self.session:
            lines.append("  session: " + self.session.replace("\n", "\n    "))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coro_module(task: asyncio.Task[Any]) -> str:
    coro: Any = task.get_coro()
    frame = (
        getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
    )
    if frame is None:
        return "?"
    return str(frame.f_globals.get("__name__", "?"))


def job_leftovers(session: Any = None, *, job_id: str = "-", reason: str = "") -> JobLeftovers:
    """Snapshot of what the current process still runs (call it in the job's event loop):
    see :class:`JobLeftovers`. Cheap: one pass over ``asyncio.all_tasks()``."""
    from .report import stuck_task
    from .stacks import parked_at

    out = JobLeftovers(job_id=job_id, reason=reason)
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        module = _coro_module(task)
        if module.startswith(_INFRA_MODULES):
            out.infra_tasks += 1
            continue
        if len(out.tasks) < _MAX_LISTED:
            entry = stuck_task(task)
            out.tasks.append({"name": entry.name, "module": module, "parked_at": parked_at(entry.stack)})
    main = threading.main_thread()
    out.threads = sorted(t.name for t in threading.enumerate() if t is not main and t.is_alive())
    from . import streams as streams_mod

    if streams_mod.installed():
        counts = streams_mod.open_streams()
        if counts.get("total", 0):
            out.streams = counts
    if session is not None:
        from .audit import audit

        with contextlib.suppress(Exception):
            result = audit(session)
            if not result.clean:
                out.session = result.describe()
    return out


def _log_leftovers(job: Any, reason: str) -> None:
    ctx = getattr(job, "_job_ctx", None)
    job_id = str(getattr(getattr(ctx, "job", None), "id", "-"))
    snap = job_leftovers(getattr(ctx, "_primary_agent_session", None), job_id=job_id, reason=reason)
    logger.info(
        "%s",
        snap.summary(),
        extra={"safeclose_job_leftovers": snap.to_dict(), "job_id": job_id},
    )


# -- idle cost report ---------------------------------------------------------------------------------


@dataclass
class ProcInfo:
    """One process of a worker's tree, read from ``/proc``.

    ``role``: ``main`` (the worker), ``idle`` (a prewarmed job process waiting for a job),
    ``job`` (running ``job_id``, or finishing it), ``starting`` (not initialized yet),
    ``inference`` (the inference process), ``forkserver``, ``resource_tracker`` (multiprocessing's),
    or, read from outside the worker
    where the pool cannot be seen, ``job-or-idle`` (a job process; which one is unknown) and
    ``other``. ``rss_mb`` counts pages shared with the forkserver in every process; ``pss_mb``
    (shared pages split between their users) and ``uss_mb`` (private pages: what ending the
    process frees) come from ``smaps_rollup``. ``cpu_percent`` is over the sampling interval."""

    pid: int
    ppid: int
    role: str
    job_id: str | None
    state: str
    rss_mb: float
    pss_mb: float | None
    uss_mb: float | None
    cpu_seconds: float
    cpu_percent: float | None
    age_seconds: float
    threads: int
    cmdline: str


@dataclass
class IdleReport:
    """A worker's process tree and what each process costs (see :func:`idle_report`)."""

    main_pid: int
    interval: float
    processes: list[ProcInfo]
    classified: bool
    num_idle_processes: int | None = None

    def by_role(self, role: str) -> list[ProcInfo]:
        return [p for p in self.processes if p.role == role]

    @staticmethod
    def _sum(procs: list[ProcInfo], attr: str) -> float | None:
        values = [getattr(p, attr) for p in procs]
        if any(v is None for v in values):
            return None
        return round(float(sum(values)), 1)

    def totals(self, role: str) -> dict[str, Any]:
        procs = self.by_role(role)
        return {
            "count": len(procs),
            "rss_mb": self._sum(procs, "rss_mb") or 0.0,
            "pss_mb": self._sum(procs, "pss_mb"),
            "uss_mb": self._sum(procs, "uss_mb"),
            "cpu_percent": self._sum(procs, "cpu_percent"),
        }

    def summary(self) -> str:
        idle_role = "idle" if self.classified else "job-or-idle"
        idle = self.totals(idle_role)

        def _mb(v: float | None) -> str:
            return "?" if v is None else f"{v:.0f}"

        setting = (
            "" if self.num_idle_processes is None else f" (num_idle_processes={self.num_idle_processes})"
        )
        label = "idle prewarmed" if self.classified else "job processes (idle or running: pool not visible)"
        jobs = self.by_role("job")
        head = (
            f"worker {self.main_pid}: {len(self.processes)} process(es); {idle['count']} {label}{setting} "
            f"hold {_mb(idle['rss_mb'])} MB RSS, {_mb(idle['pss_mb'])} MB PSS, {_mb(idle['uss_mb'])} MB USS, "
            f"{'?' if idle['cpu_percent'] is None else format(idle['cpu_percent'], '.1f')}% CPU"
        )
        if self.classified:
            head += f"; {len(jobs)} job process(es)" + (
                f" ({', '.join(str(p.job_id) for p in jobs)})" if jobs else ""
            )
        rows = [
            head,
            "    pid  role          job            rss MB  pss MB  uss MB   cpu%    cpu s    age s  st  thr",
        ]
        for p in self.processes:
            cpu = "-" if p.cpu_percent is None else f"{p.cpu_percent:.1f}"
            rows.append(
                f"  {p.pid:>5}  {p.role:<12}  {(p.job_id or '-')[:13]:<13}  {p.rss_mb:>6.0f}  {_mb(p.pss_mb):>6}  "
                f"{_mb(p.uss_mb):>6}  {cpu:>5}  {p.cpu_seconds:>7.1f}  {p.age_seconds:>7.0f}  {p.state:>2}  {p.threads:>3}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["idle"] = self.totals("idle" if self.classified else "job-or-idle")
        return out


def _sysconf(name: str, default: int) -> int:
    try:
        return int(os.sysconf(name))
    except (ValueError, OSError, AttributeError):
        return default


_CLK_TCK = _sysconf("SC_CLK_TCK", 100)
_PAGE = _sysconf("SC_PAGE_SIZE", 4096)


def _read_stat(pid: int) -> tuple[str, int, float, float, int] | None:
    """(state, ppid, cpu seconds, start seconds since boot, threads) from /proc/<pid>/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    try:
        cpu = (int(rest[11]) + int(rest[12])) / _CLK_TCK
        return rest[0], int(rest[1]), cpu, int(rest[19]) / _CLK_TCK, int(rest[17])
    except (IndexError, ValueError):
        return None


def _read_mem(pid: int) -> tuple[float, float | None, float | None]:
    """(RSS, PSS, USS) in MB; PSS/USS are None without a readable smaps_rollup."""
    rss = 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE / 2**20
    pss: float | None = None
    uss: float | None = None
    try:
        kb: dict[str, int] = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                kb[parts[0][:-1]] = int(parts[1])
        if "Pss" in kb:
            pss = kb["Pss"] / 1024
            uss = (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024
    except OSError:
        pass
    return rss, pss, uss


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _read_stat(int(entry.name))
        if st is not None:
            children.setdefault(st[1], []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def _pool_roles(server: Any) -> tuple[dict[int, tuple[str, str | None]], int | None]:
    """pid -> (role, job id) from the worker's process pool; read on the worker's loop."""
    roles: dict[int, tuple[str, str | None]] = {}
    pool = getattr(server, "_proc_pool", None)
    for proc in list(getattr(pool, "processes", []) or []):
        pid = getattr(proc, "pid", None)
        if pid is None:
            continue
        running = getattr(proc, "running_job", None)
        init = getattr(proc, "_initialize_fut", None)
        if running is not None:
            roles[pid] = ("job", str(getattr(getattr(running, "job", None), "id", "?")))
        elif init is not None and init.done() and not init.cancelled() and init.exception() is None:
            roles[pid] = ("idle", None)
        else:
            roles[pid] = ("starting", None)
    inference_pid = getattr(getattr(server, "_inference_executor", None), "pid", None)
    if inference_pid is not None:
        roles[inference_pid] = ("inference", None)
    setting: int | None = None
    with contextlib.suppress(Exception):
        setting = int(getattr(pool, "_default_num_idle_processes"))  # noqa: B009
    return roles, setting


def _the_server(server: Any) -> Any:
    if server is not None:
        return server
    seen = list(_servers)
    return seen[0] if len(seen) == 1 else None


class _Sampler:
    def __init__(self, main_pid: int, roles: dict[int, tuple[str, str | None]] | None) -> None:
        if not Path("/proc/self/stat").exists():
            raise RuntimeError("idle_report reads /proc: Linux only")
        self.main_pid = main_pid
        self.roles = roles
        self.pids = _descendants(main_pid)
        self.t0 = time.monotonic()
        self.cpu0 = {pid: st[2] for pid in self.pids if (st := _read_stat(pid)) is not None}

    def finish(self, interval: float, setting: int | None) -> IdleReport:
        elapsed = time.monotonic() - self.t0
        try:
            uptime = float(Path("/proc/uptime").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            uptime = 0.0
        forkservers = {pid for pid in self.pids if "forkserver" in _cmdline(pid) and pid != self.main_pid}
        procs: list[ProcInfo] = []
        for pid in self.pids:
            st = _read_stat(pid)
            if st is None:
                continue
            state, ppid, cpu, start, threads = st
            cmd = _cmdline(pid)
            job_id: str | None = None
            if pid == self.main_pid:
                role = "main"
            elif self.roles is not None and pid in self.roles:
                role, job_id = self.roles[pid]
            elif ppid in forkservers:
                role = "job-or-idle" if self.roles is None else "other"
            elif pid in forkservers:
                role = "forkserver"
            elif "resource_tracker" in cmd:
                role = "resource_tracker"
            else:
                role = "other"
            rss, pss, uss = _read_mem(pid)
            pct: float | None = None
            if interval > 0 and pid in self.cpu0 and elapsed > 0:
                pct = round(100.0 * (cpu - self.cpu0[pid]) / elapsed, 1)
            procs.append(
                ProcInfo(
                    pid=pid,
                    ppid=ppid,
                    role=role,
                    job_id=job_id,
                    state=state,
                    rss_mb=round(rss, 1),
                    pss_mb=None if pss is None else round(pss, 1),
                    uss_mb=None if uss is None else round(uss, 1),
                    cpu_seconds=round(cpu, 2),
                    cpu_percent=pct,
                    age_seconds=round(max(0.0, uptime - start), 1),
                    threads=threads,
                    cmdline=cmd,
                )
            )
        return IdleReport(
            main_pid=self.main_pid,
            interval=round(elapsed, 3) if interval > 0 else 0.0,
            processes=procs,
            classified=self.roles is not None,
            num_idle_processes=setting,
        )


def idle_report(server: Any = None, *, pid: int | None = None, interval: float = 0.5) -> IdleReport:
    """What a worker's processes cost: every process under the worker's main process with its
    role, memory (RSS/PSS/USS from ``/proc/<pid>/statm`` and ``smaps_rollup``) and CPU (total,
    and percent over ``interval`` seconds; ``0`` skips the sampling). Linux only.

    Inside the worker, pass the ``AgentServer`` (or let the patches' record of it be used) to
    tell idle prewarmed processes from running jobs; this blocks for ``interval``, so from the
    worker's event loop use :func:`aidle_report`. From outside (``pid`` = the worker's main pid,
    e.g. ``python -m livekit_safeclose.worker idle-report --pid PID``) job processes are listed as
    ``job-or-idle``: the pool's bookkeeping is not visible there."""
    srv = _the_server(server) if pid is None else server
    roles, setting = _pool_roles(srv) if srv is not None else (None, None)
    sampler = _Sampler(os.getpid() if pid is None else pid, roles)
    if interval > 0:
        time.sleep(interval)
    return sampler.finish(interval, setting)


async def aidle_report(server: Any = None, *, interval: float = 0.5) -> IdleReport:
    """:func:`idle_report` for the worker's own event loop (sleeps instead of blocking)."""
    srv = _the_server(server)
    roles, setting = _pool_roles(srv) if srv is not None else (None, None)
    sampler = _Sampler(os.getpid(), roles)
    if interval > 0:
        await asyncio.sleep(interval)
    return sampler.finish(interval, setting)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m livekit_safeclose.worker idle-report --pid PID [--interval S] [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m livekit_safeclose.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("idle-report", help="what a running worker's processes cost (Linux /proc)")
    rep.add_argument("--pid", type=int, required=True, help="the worker's main process id")
    rep.add_argument("--interval", type=float, default=1.0, help="CPU sampling interval, seconds")
    rep.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if not Path(f"/proc/{args.pid}").exists():
        parser.error(f"no process {args.pid}")
    report = idle_report(pid=args.pid, interval=args.interval)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
