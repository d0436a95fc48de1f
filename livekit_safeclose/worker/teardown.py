"""The bounded teardown of a job once its session closed (job and supervisor side).

The ``bounded_teardown`` part; :mod:`.job_shutdown` enters :func:`bounded_steps`.

After ``session.aclose()`` upstream's ``_JobProc._shutdown_job`` awaits
``JobContext._on_session_end()`` (the recorder close and the session report),
``room.disconnect()`` and the shutdown callbacks with no bound, and the worker waits for a job
process that ended by itself for as long as it takes to exit. Here, while a job shuts down
(:func:`teardown` is entered by :mod:`.job_shutdown`), each of those steps runs in its own task
bounded by ``close_timeout``; one that does not finish is logged with the line it is parked
on and cancelled without waiting for it, and the next step runs. Each shutdown callback gets
its own bound, so a hung one neither holds the others nor the process exit, and an exception
in one no longer stops the wait for the others. On the supervisor's side, a job process that
announced ``ShuttingDown`` but is still alive :func:`~.bounds.teardown_bound` seconds later
is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from .. import metrics, patching
from ..options import Options
from ..report import stuck_task
from ..stacks import parked_at
from . import bounds
from .kill import kill_job_process

logger = logging.getLogger("livekit.agents.safeclose")

#: set while this task runs a job's shutdown sequence: the steps below are bounded then
_in_teardown: contextvars.ContextVar[bool] = contextvars.ContextVar("safeclose_teardown", default=False)
#: how long a cancelled step gets to unwind before the teardown goes on without it
STEP_UNWIND = 0.2


async def bounded(step: Awaitable[Any], what: str, bound: float) -> Any:
    """Await ``step`` in its own task for at most ``bound`` seconds; past that log where it is
    parked, cancel it and return ``None`` without waiting for it to finish (lock-free: a step
    that swallows the cancellation cannot hold the teardown). Its exception is re-raised."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.wait({task}, timeout=bound)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    where = parked_at(stuck_task(task).stack)
    logger.warning(
        "job teardown: %s did not finish within close_timeout=%.1fs; cancelled (parked at %s)",
        what,
        bound,
        where,
        extra={"safeclose_teardown_step": what, "safeclose_parked_at": where},
    )
    task.cancel()
    await asyncio.wait({task}, timeout=STEP_UNWIND)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: a late error is not reported as never retrieved
    return None


def _callback_label(callback: Any) -> str:
    return str(getattr(callback, "__qualname__", None) or getattr(callback, "__name__", None) or callback)


def _bounded_callback(callback: Callable[[str], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
    """The shutdown callback, bounded by close_timeout; its error is logged, not raised, so
    upstream's gather waits for the other callbacks (``functools.wraps`` keeps the name and
    module upstream's trace reads)."""
    if getattr(callback, "_safeclose_bounded", False):
        return callback

    @functools.wraps(callback)
    async def _run(reason: str) -> None:
        label = f"shutdown callback {_callback_label(callback)}"
        try:
            await bounded(callback(reason), label, bounds.close_timeout())
        except Exception:
            logger.exception("job teardown: %s raised", label)

    _run._safeclose_bounded = True  # type: ignore[attr-defined]
    return _run


@contextlib.contextmanager
def bounded_steps(job_proc: Any) -> Iterator[None]:
    """While the job shuts down (the ``bounded_teardown`` part applied): bound its shutdown
    callbacks (rewrapped in place) and mark the task, so ``room.disconnect()`` and
    ``_on_session_end()`` are bounded too."""
    if "bounded_teardown" not in patching.applied_parts():
        yield
        return
    job_ctx = getattr(job_proc, "_job_ctx", None)
    callbacks = getattr(job_ctx, "_shutdown_callbacks", None)
    if isinstance(callbacks, list):
        callbacks[:] = [_bounded_callback(cb) for cb in callbacks]
    token = _in_teardown.set(True)
    try:
        yield
    finally:
        _in_teardown.reset(token)


def _bounded_in_teardown(original: Callable[..., Any], what: str) -> Callable[..., Any]:
    @functools.wraps(original)
    async def _step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _in_teardown.get():
            return await original(self, *args, **kwargs)
        return await bounded(original(self, *args, **kwargs), what, bounds.close_timeout())

    return _step


def wrap_room_disconnect(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``rtc.Room.disconnect``: bounded during a job's teardown."""
    return _bounded_in_teardown(original, "room.disconnect()")


def wrap_on_session_end(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``JobContext._on_session_end`` (the recorder close, the session
    report): bounded during a job's teardown."""
    return _bounded_in_teardown(original, "JobContext._on_session_end() (recorder close, session report)")


# -- supervisor side -------------------------------------------------------------------------


async def _kill_if_alive(proc: Any, bound: float) -> None:
    supervise = getattr(proc, "_supervise_atask", None)
    if supervise is None or supervise.done():
        return
    await kill_job_process(
        proc, "job process %s still running %.1fs after its shutdown began; killing it", bound
    )


def _forget_if_exited(proc: Any) -> None:
    pid = getattr(proc, "pid", None)
    if pid and getattr(proc, "exitcode", None) is not None:
        try:
            metrics.forget_process(pid)
        except OSError:  # a directory removed under a running worker: nothing to forget
            logger.debug("could not drop the gauges of job process %s", pid, exc_info=True)


def wrap_supervise_task(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``SupervisedProc._supervise_task``: once the process said
    ``ShuttingDown``, it is killed if still alive ``teardown_bound(close_timeout)`` later.
    Once it exited, its live gauges are dropped in multiprocess mode (prometheus_client
    keeps a dead process's ``gauge_live*_<pid>.db`` until told: upstream's job gauges and
    the layer's would count it, and the directory grows by one file per job, forever)."""

    @functools.wraps(original)
    async def _supervise_task(self: Any) -> None:
        loop = asyncio.get_running_loop()
        timers: list[asyncio.TimerHandle] = []
        kills: set[asyncio.Task[None]] = set()

        def _arm(_: Any) -> None:
            bound = bounds.teardown_bound(bounds.close_timeout())

            def _fire() -> None:
                kill = loop.create_task(_kill_if_alive(self, bound), name="safeclose_teardown_kill")
                kills.add(kill)
                kill.add_done_callback(kills.discard)

            timers.append(loop.call_later(bound, _fire))

        self._shutting_down_fut.add_done_callback(_arm)
        try:
            await original(self)
        finally:
            self._shutting_down_fut.remove_done_callback(_arm)
            for timer in timers:
                timer.cancel()
            _forget_if_exited(self)

    return _supervise_task
