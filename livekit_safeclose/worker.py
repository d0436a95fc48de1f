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
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

__all__ = [
    "drain_requested",
    "install_drain_availability",
    "install_signal_guard",
    "uninstall_drain_availability",
    "uninstall_signal_guard",
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


def _draining_now() -> bool:
    return drain_requested() or any(getattr(s, "_draining", False) for s in list(_servers))


# -- the dispatcher: the OS-level handler while a patch is active -------------------------------


def _call_cli(signum: int, frame: FrameType | None) -> None:
    cli = _state.cli.get(signum)
    _state.cli_called = True
    if callable(cli):
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
        if sig not in _HANDLED_SIGNALS or not (_state.guard or _state.drain_intent):
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
        raise RuntimeError(
            f"livekit_safeclose.worker: {what} is missing from the installed livekit-agents; "
            "this patch supports livekit-agents 1.8.x"
        )
    return value


def _require_own(cls: type, attr: str, what: str) -> Any:
    """Like :func:`_require`, but the class must define ``attr`` itself: restoring an inherited
    attribute with ``setattr`` would leave a copy on the subclass, not the original state."""
    value = vars(cls).get(attr)
    if value is None:
        raise RuntimeError(
            f"livekit_safeclose.worker: {what} is missing from the installed livekit-agents; "
            "this patch supports livekit-agents 1.8.x"
        )
    return value


def _check_cli_shape() -> None:
    try:
        from livekit.agents.cli import cli as lk_cli
    except ImportError as e:
        raise RuntimeError(
            "livekit_safeclose.worker: livekit.agents.cli.cli is missing "
            "(the CLI whose SIGTERM handler this patch protects)"
        ) from e
    _require(lk_cli, "_run_worker", "livekit.agents.cli.cli._run_worker")
    if lk_cli.__name__ not in _CLI_MODULES:
        raise RuntimeError(f"livekit_safeclose.worker: unexpected CLI module {lk_cli.__name__}")


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
        if _state.drain_intent:
            _tap_refresh_after_guard_off()
        else:
            _tap_uninstall()


# -- public API: draining means unavailable --------------------------------------------------------


def _agent_server_cls() -> Any:
    try:
        from livekit.agents.worker import AgentServer
    except ImportError as e:
        raise RuntimeError("livekit_safeclose.worker: livekit.agents.worker.AgentServer is missing") from e
    return AgentServer


def _job_request_cls() -> Any:
    try:
        from livekit.agents.job import JobRequest
    except ImportError as e:
        raise RuntimeError("livekit_safeclose.worker: livekit.agents.job.JobRequest is missing") from e
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
            raise RuntimeError(
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
        if not _state.guard:
            _tap_uninstall()
