"""The bounded end of a drain, on the supervisor's side (the worker's main process).

When ``--drain-timeout`` expires upstream shuts the remaining jobs down without a bound: the
supervisor waits for each job's ``ShuttingDown`` with no timeout. Here the end is *forced*
instead: each process running a job first gets ``ShutdownRequest(reason="safeclose: forced
close (...)")``, which its job side (:mod:`.job_shutdown`) reads as "force-close the session
now", and a process still alive :func:`~.bounds.proc_close_bound` seconds later is killed.
A drain that finishes within ``--drain-timeout`` is never cut.

A second SIGTERM/SIGINT keeps upstream's contract (exit at once) unless
``install(force_close_on_second_signal=True)``: then it forces the end the same way, a
watchdog exits the process if that takes longer than the processes' bound, and a third
signal exits at once.

The forced-end state is per process. It is reset, and the watchdog cancelled, when the
worker's shutdown completes (the CLI's ``_run_worker`` returns; for a worker run without the
CLI, ``AgentServer.aclose()`` returns), so a process that goes on (an embedded worker, a test
suite) is neither killed later nor left with a drain that times out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .. import patching
from ..options import Options
from . import bounds, handoff, servers
from .kill import kill_job_process

logger = logging.getLogger("livekit.agents.safeclose")

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


@dataclass
class _EndState:
    """Process-wide state of the bounded end of drain."""

    reason: str | None = None
    at: float | None = None
    #: how many signals forced the end (a signal after that is the CLI's: exit at once)
    signals: int = 0
    waiters: list[_Waiter] = field(default_factory=list)
    watchdog: threading.Timer | None = None
    #: CLI worker runs in progress (their end resets the state, not the server's aclose)
    cli_runs: int = 0
    #: what this release lacks for force_close_on_second_signal (``None``: not checked)


_end = _EndState()
# job processes already told why their shutdown is forced
_told: weakref.WeakSet[Any] = weakref.WeakSet()


def forced_end_reason() -> str | None:
    """Why this process's drain was ended by force (``None`` while it was not): the reason the
    running jobs' ``ShutdownRequest`` carries, e.g. ``"safeclose: forced close (drain timed
    out)"``. Job processes see it as their shutdown reason."""
    return _end.reason


# -- forcing the end ------------------------------------------------------------------------


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


def force_end(why: str) -> None:
    """Force the end of the drain and wake every drain and job-process close waiting on it.
    Safe from any thread and from a signal handler: assignments and ``call_soon_threadsafe``."""
    if _end.reason is None:
        _end.reason = f"{bounds.FORCED_REASON_PREFIX} ({why})"
        _end.at = time.monotonic()
    for loop, fut in list(_end.waiters):
        with contextlib.suppress(RuntimeError):  # that loop is closed
            loop.call_soon_threadsafe(_resolve, fut)


def force_end_from_signal(why: str) -> bool:
    """A signal asks for the end (``force_close_on_second_signal``): True the first time;
    after that the signal is the CLI's (exit at once). Signal-safe."""
    if _end.signals:
        return False
    _end.signals += 1
    force_end(why)
    return True


def _watchdog_exit(delay: float) -> None:
    logger.error("forced shutdown still running %.1fs after the second signal; exiting now", delay)
    os._exit(1)


def announce_signal_forced_end(why: str) -> None:
    """The part of a signal-forced end that cannot run in a signal handler (it runs on the
    loop): the WARNING, and the watchdog that exits if the bounded shutdown itself hangs.
    Nothing once the shutdown completed meanwhile (the state was reset)."""
    if _end.reason is None:
        return
    ct = bounds.close_timeout()
    logger.warning(
        "%s during shutdown: force-closing the running jobs' sessions (bounded by "
        "close_timeout=%.1fs) before the worker exits; signal again to exit at once",
        why,
        ct,
    )
    if _end.watchdog is None:
        delay = bounds.proc_close_bound(ct) + bounds.WATCHDOG_SLACK
        timer = threading.Timer(delay, _watchdog_exit, args=(delay,))
        timer.daemon = True
        timer.name = "safeclose-exit-watchdog"
        _end.watchdog = timer
        timer.start()


def second_signal_closes() -> bool:
    """True when a second signal force-closes the jobs instead of exiting at once (the
    ``force_close_on_second_signal`` part is applied). Signal-safe."""
    return "force_close_on_second_signal" in patching.applied_parts()


def shutdown_complete() -> None:
    """The worker's shutdown completed: cancel the exit watchdog and reset the forced-end
    state, so a later drain in this process starts fresh."""
    if _end.watchdog is not None:
        _end.watchdog.cancel()
    _end.watchdog = None
    _end.reason = None
    _end.at = None
    _end.signals = 0


def reset() -> None:
    """``on_revert`` of the bounded end's rows."""
    shutdown_complete()
    _told.clear()


# -- AgentServer.drain / AgentServer.aclose / the CLI's worker run --------------------------


def _job_count(server: Any) -> int:
    return len(server.active_jobs)


async def _drain(
    original: Callable[..., Coroutine[Any, Any, None]], server: Any, *args: Any, **kwargs: Any
) -> None:
    servers.remember(server)
    handoff.flush()
    if _end.reason is not None:  # a second signal came before the drain started
        raise asyncio.TimeoutError(_end.reason)
    waiter = _end_waiter()
    inner = asyncio.ensure_future(original(server, *args, **kwargs))
    try:
        await asyncio.wait({inner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        inner.cancel()
        raise
    finally:
        waiter.cancel()
    jobs = _job_count(server)
    if inner.done():
        try:
            return inner.result()
        except asyncio.TimeoutError:
            force_end("drain timed out")
            logger.warning(
                "drain timed out with %d job(s) still running: force-closing their sessions "
                "(bounded by close_timeout=%.1fs) before their processes end",
                jobs,
                bounds.close_timeout(),
            )
            raise
    inner.cancel()
    await asyncio.wait({inner}, timeout=1.0)
    logger.warning("drain ended early by a second signal with %d job(s) still running", jobs)
    raise asyncio.TimeoutError(_end.reason)


def wrap_drain(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``AgentServer.drain``: its timeout (or, with
    ``force_close_on_second_signal``, a second signal) forces the end of the drain."""

    @functools.wraps(original)
    async def drain(self: Any, *args: Any, **kwargs: Any) -> None:
        await _drain(original, self, *args, **kwargs)

    return drain


def wrap_server_aclose(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``AgentServer.aclose``: once it returned, the worker's shutdown
    is complete (outside a CLI run, whose own end does it)."""

    @functools.wraps(original)
    async def aclose(self: Any) -> None:
        handoff.flush()
        try:
            await original(self)
        finally:
            if not _end.cli_runs:
                shutdown_complete()

    return aclose


def wrap_run_worker(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``livekit.agents.cli.cli._run_worker``: when the CLI's worker
    run returns, the shutdown is complete."""

    @functools.wraps(original)
    def _run_worker(*args: Any, **kwargs: Any) -> Any:
        _end.cli_runs += 1
        try:
            return original(*args, **kwargs)
        finally:
            _end.cli_runs -= 1
            handoff.flush()
            shutdown_complete()

    return _run_worker


# -- SupervisedProc.aclose ------------------------------------------------------------------


async def _tell_forced(proc: Any) -> None:
    """Tell a job process running a job why it is being shut down, before upstream's plain
    ``ShutdownRequest()``: its job side then force-closes the session at once."""
    if proc in _told or getattr(proc, "running_job", None) is None:
        return  # told already, or no job (idle, inference): nothing to close first
    _told.add(proc)
    from livekit.agents.ipc import channel, proto

    reason = _end.reason or bounds.FORCED_REASON_PREFIX
    try:
        send = channel.asend_message(proc._pch, proto.ShutdownRequest(reason=reason))
        await asyncio.wait_for(send, timeout=bounds.PROC_EXIT_SLACK)
    except Exception:  # the channel is closed (the process is ending on its own) or stuck
        logger.debug("could not send the forced shutdown to job process %s", proc.pid, exc_info=True)


async def _bounded_proc_close(proc: Any, task: asyncio.Future[None]) -> None:
    bound = bounds.proc_close_bound(bounds.close_timeout())
    await asyncio.wait({task}, timeout=bound)
    if task.done():
        return task.result()
    await kill_job_process(
        proc, "job process %s did not end within %.1fs of its forced shutdown; killing it", bound
    )
    pid = getattr(proc, "pid", None)
    await asyncio.wait({task}, timeout=bounds.PROC_EXIT_SLACK + 1.0)
    if task.done():
        return task.result()
    logger.error("job process %s: close still pending after the kill", pid)
    return None


async def _proc_aclose(original: Callable[..., Coroutine[Any, Any, None]], proc: Any) -> None:
    if _end.reason is not None:
        await _tell_forced(proc)
    waiter = _end_waiter()
    task = asyncio.ensure_future(original(proc))
    try:
        if _end.reason is None:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            # forced while upstream's close runs: its plain request already went out
        return await _bounded_proc_close(proc, task)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()


def wrap_proc_aclose(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``SupervisedProc.aclose``: bounded once the drain is forced."""

    @functools.wraps(original)
    async def aclose(self: Any) -> None:
        await _proc_aclose(original, self)

    return aclose
