"""The signal guard: SIGTERM keeps meaning "drain" in the worker's main process.

livekit-agents' CLI (``livekit.agents.cli.cli._run_worker``) installs its SIGTERM/SIGINT
handler with ``signal.signal``: the first call schedules the drain, a second one exits at
once (``os._exit(1)``). Any later ``signal.signal(SIGTERM, h)`` or
``loop.add_signal_handler(SIGTERM, h)`` in the worker's main process (``request_fnc``, a
``worker_started`` hook, aiohttp's ``AppRunner``) silently replaces it, so SIGTERM no longer
drains; a replacement raising ``SystemExit`` skips the drain altogether.

The tap (patched ``signal.signal``, every worker part) recognises the CLI's handler by its
module and installs :func:`dispatch` at the OS level in its place. With the guard
(``signal_guard``) a user replacement is recorded and run after the CLI's handler, once per
signal, and ``loop.add_signal_handler`` no longer displaces the CLI's handler. Before the
CLI runs (import time, ``prewarm``, job processes) nothing changes.

:func:`dispatch` runs between two bytecodes of the main thread: it sets flags, calls the
CLI's handler (itself built to run there) and the user's, and hands anything else (logging,
the start of a forced end, its watchdog) to the loop through :mod:`.handoff`.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from .. import patching
from ..options import Options
from . import drain_end, handoff

logger = logging.getLogger("livekit.agents.safeclose")

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

HANDLED_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
#: the package whose functions are the CLI's own handlers (run, force-exit, final)
_CLI_PACKAGE = "livekit.agents.cli"
_FRAMEWORK_PREFIX = "livekit.agents."
_ASYNCIO_UNIX_MODULE = "asyncio.unix_events"
#: frames between a caller of ``signal.signal`` and :func:`_caller_module`
_TAP_DEPTH = 3


@dataclass
class _Tap:
    """Process-wide state of the ``signal.signal`` tap."""

    #: ``signal.signal`` as it was before the tap (``None``: not tapped)
    original: Callable[..., Any] | None = None
    #: the CLI's current handler per signal; a signal is "armed" once it has one
    cli: dict[int, Handler] = field(default_factory=dict)
    #: what user code last asked for, per signal (guard only); ``None``: no user handler
    user: dict[int, Handler] = field(default_factory=dict)
    drain_requested_at: float | None = None
    # per delivery, so one signal calls the CLI's handler at most once
    delivering: int = 0
    cli_called: bool = False
    cli_exc: BaseException | None = None


_tap = _Tap()
_lock = threading.RLock()


# -- helpers ------------------------------------------------------------------------------


def describe(handler: object) -> str:
    """``module.qualname`` of a handler, or ``signal.SIG_DFL``/``SIG_IGN``."""
    if handler is None:
        return "None"
    if isinstance(handler, int) and not callable(handler):
        for name in ("SIG_DFL", "SIG_IGN"):
            if handler == getattr(signal, name):
                return f"signal.{name}"
        return repr(handler)
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", None) or getattr(handler, "__name__", None)
    return f"{module}.{qualname}" if module and qualname else repr(handler)


def is_cli_handler(handler: object) -> bool:
    module = getattr(handler, "__module__", None) or ""
    return callable(handler) and (module == _CLI_PACKAGE or module.startswith(_CLI_PACKAGE + "."))


def sig_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _caller_module(depth: int) -> str:
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return ""
    return str(frame.f_globals.get("__name__", ""))


def _cell(fn: Any, name: str) -> Any:
    """The value of the closure variable ``name`` of ``fn`` (``None`` if absent or empty)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None:
        return None
    for var, cell in zip(code.co_freevars, closure, strict=False):
        if var == name:
            try:
                return cell.cell_contents
            except ValueError:  # an empty cell
                return None
    return None


def is_exit_now(handler: object) -> bool:
    """True when calling the CLI ``handler`` now means ``os._exit(1)``: ``_force_exit`` (a signal
    during the drain or the close), or ``_handle_exit`` for the second time. The CLI watchdog's
    re-signal of a blocked loop (``escalating``) is not an operator's signal: left alone. Reads
    the closures the ``SECOND_SIGNAL`` rows of the compatibility table check."""
    if not is_cli_handler(handler):
        return False
    code = getattr(handler, "__code__", None)
    if code is None or _cell(handler, "escalating"):
        return False
    if code.co_name == "_force_exit":
        return True
    return code.co_name == "_handle_exit" and bool(_cell(handler, "exit_raised"))


def drain_requested() -> bool:
    """True once SIGTERM/SIGINT reached the CLI's handler in this process (through the tap)."""
    return _tap.drain_requested_at is not None


def _guard_on() -> bool:
    return "signal_guard" in patching.applied_parts()


# -- the dispatcher: the OS-level handler once the CLI's is armed --------------------------


def _call_cli(signum: int, frame: FrameType | None) -> None:
    cli = _tap.cli.get(signum)
    _tap.cli_called = True
    if not callable(cli):
        return
    if drain_end.second_signal_closes() and is_exit_now(cli):
        why = f"second {sig_name(signum)}"
        if drain_end.force_end_from_signal(why):
            # instead of the CLI's os._exit(1): the running sessions are force-closed, bounded
            handoff.later(drain_end.announce_signal_forced_end, why)
            return
    try:
        cli(signum, frame)
    except BaseException as e:  # the CLI's own raise (its blocked-loop escalation): propagates
        _tap.cli_exc = e
        raise


def _user_handler_raised(signum: int, handler: object, exc: BaseException) -> None:
    logger.warning(
        "user %s handler %s raised %s; ignored so the worker keeps draining",
        sig_name(signum),
        describe(handler),
        type(exc).__name__,
        exc_info=(type(exc), exc, exc.__traceback__),
    )


def dispatch(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM/SIGINT handler at the OS level while the CLI's handler is armed.

    Calls the CLI's handler exactly once (the drain), then the user's replacement, if any:
    the CLI goes first so a user handler that blocks or raises cannot delay or skip the drain.
    Only flags are set here; logging and the rest run later (:mod:`.handoff`)."""
    if _tap.drain_requested_at is None:
        _tap.drain_requested_at = time.monotonic()
    outer_called = _tap.cli_called
    _tap.delivering += 1
    _tap.cli_called = False
    try:
        _call_cli(signum, frame)
        user = _tap.user.get(signum)
        if callable(user) and _guard_on():
            try:
                user(signum, frame)
            except BaseException as e:
                if e is _tap.cli_exc:  # a nested signal's CLI raise passing through
                    raise
                handoff.later(_user_handler_raised, signum, user, e)
    finally:
        _tap.delivering -= 1
        _tap.cli_called = outer_called


class CliProxy:
    """Handed to user code as the "previous handler", so chaining to it is safe.

    Inside a delivery the CLI's handler already ran (calling it again would mean "second
    signal, exit now"), so the proxy does nothing there; called outside a delivery it forwards.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if _tap.delivering and _tap.cli_called:
            return
        cli = _tap.cli.get(self.signum)
        if callable(cli):
            cli(signum, frame)

    def __repr__(self) -> str:
        return f"<livekit-agents CLI {sig_name(self.signum)} handler (safeclose proxy)>"


# -- the tap: patched signal.signal ---------------------------------------------------------


def _record_user_handler(orig: Callable[..., Any], sig: int, handler: Handler, caller: str) -> Handler:
    """The guard's answer to user code replacing an armed handler: record, warn, keep ours."""
    current = signal.getsignal(sig)
    if caller == _ASYNCIO_UNIX_MODULE:
        # loop.add/remove_signal_handler bookkeeping: the loop callback is delivered through
        # set_wakeup_fd whatever Python-level handler is installed, so keep ours
        return current
    previous = _tap.user.get(sig)
    if isinstance(handler, CliProxy):  # the user restoring what we handed out
        _tap.user[sig] = None
        if current is not signal.SIG_IGN:
            orig(sig, dispatch)
        return previous if previous is not None else handler
    _tap.user[sig] = handler if callable(handler) else None
    logger.warning(
        "%s tried to replace the livekit-agents %s handler; kept the worker's drain "
        "and will run it after the drain starts",
        describe(handler),
        sig_name(sig),
        extra={"caller": caller},
    )
    if current is not signal.SIG_IGN:  # SIG_IGN = a framework mask; its restore re-arms
        orig(sig, dispatch)
    return previous if previous is not None else CliProxy(sig)


def _tapped_signal(orig: Callable[..., Any], signalnum: int, handler: Handler) -> Handler:
    sig = int(signalnum)
    with _lock:
        if sig not in HANDLED_SIGNALS or _tap.original is None or handler is dispatch:
            # not ours, not tapped any more, or a framework restore of our dispatcher
            return orig(signalnum, handler)  # type: ignore[no-any-return]
        if is_cli_handler(handler):  # the CLI (re)setting its handler: arm / follow it
            _tap.cli[sig] = handler
            return orig(signalnum, dispatch)  # type: ignore[no-any-return]
        caller = _caller_module(_TAP_DEPTH)
        if sig not in _tap.cli or caller.startswith(_FRAMEWORK_PREFIX) or not _guard_on():
            # not armed yet (the CLI's handler will win anyway), a framework mask such as
            # _mask_ctrl_c's SIG_IGN around spawns, or no guard: upstream's semantics
            return orig(signalnum, handler)  # type: ignore[no-any-return]
        return _record_user_handler(orig, sig, handler, caller)


def tap(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``signal.signal``. Arms at once if the CLI already runs
    (``install()`` called from ``request_fnc`` or a ``worker_started`` hook)."""

    @functools.wraps(original)
    def signal_(signalnum: int, handler: Handler) -> Handler:
        return _tapped_signal(original, signalnum, handler)

    with _lock:
        _tap.original = original
        for sig in HANDLED_SIGNALS:
            current = signal.getsignal(sig)
            if is_cli_handler(current):
                _tap.cli[sig] = current
                original(sig, dispatch)
    return signal_


def untap() -> None:
    """``on_revert`` of the tap: hand each armed signal to the handler upstream would have
    left installed (the last one asked for), and forget everything."""
    with _lock:
        orig = _tap.original
        if orig is None:
            return
        for sig, cli in _tap.cli.items():
            if signal.getsignal(sig) is dispatch:
                user = _tap.user.get(sig)
                orig(sig, user if user is not None else cli)
        _tap.original = None
        _tap.cli.clear()
        _tap.user.clear()
        _tap.drain_requested_at = None
    handoff.flush()


def guard_off() -> None:
    """``on_revert`` of the guard's row: user handlers recorded by the guard get upstream's
    semantics back (the last one asked for is installed); the tap stays for the other parts."""
    with _lock:
        orig = _tap.original
        if orig is None:
            return
        for sig, user in list(_tap.user.items()):
            if user is not None and signal.getsignal(sig) is dispatch:
                orig(sig, user)
                _tap.cli.pop(sig, None)
        _tap.user.clear()


# -- the guard: loop.add_signal_handler -----------------------------------------------------


def _wrap_loop_callback(sig: int, callback: Callable[..., Any]) -> Callable[..., Any]:
    """Keep a loop signal callback from ending the worker loop by raising SystemExit (it runs
    on the loop, so it logs directly)."""

    @functools.wraps(callback)
    def _safeclose_loop_signal_callback(*args: Any) -> None:
        try:
            callback(*args)
        except (SystemExit, KeyboardInterrupt) as e:
            logger.warning(
                "loop %s callback %s raised %s; ignored so the worker keeps draining",
                sig_name(sig),
                describe(callback),
                type(e).__name__,
                exc_info=True,
            )

    return _safeclose_loop_signal_callback


def wrap_add_signal_handler(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``_UnixSelectorEventLoop.add_signal_handler``: a SIGTERM/SIGINT
    callback added once the CLI's handler is armed runs too, without displacing it."""

    @functools.wraps(original)
    def add_signal_handler(self: Any, sig: int, callback: Callable[..., Any], *args: Any) -> None:
        if int(sig) in HANDLED_SIGNALS and int(sig) in _tap.cli and _guard_on():
            logger.warning(
                "%s tried to replace the livekit-agents %s handler via loop.add_signal_handler; "
                "kept the worker's drain and will run it too",
                describe(callback),
                sig_name(int(sig)),
            )
            callback = _wrap_loop_callback(int(sig), callback)
        original(self, sig, callback, *args)

    return add_signal_handler
