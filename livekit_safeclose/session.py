"""AgentSession side of a bounded close: one shared closing task that runs upstream's close
and watches it.

Upstream (1.8.x) awaits ``AgentActivity.drain()`` without a bound on every close path, so
one speech task that never settles keeps the session, and its provider streams, open
forever. Here every close path (``aclose()``, ``shutdown()``, close-on-disconnect, error
close, job shutdown) joins one task that runs upstream's ``_aclose_impl`` unchanged and
watches it phase by phase (see :class:`~.bounded_close.BoundedClose`):

* **drain**: at the drain bound, every activity of the session is force-cancelled lock-free
  (interrupt futures, the current speech and ``AgentTask`` waits end with their tasks);
* **models**, **steps**, **after**: bounded as the phase says; a phase that overruns
  abandons upstream's close, and :mod:`.completion` finishes what it did not reach (the
  close event included).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import time
from collections.abc import Callable, Coroutine
from typing import Any

from . import options as options_mod
from . import patching
from . import streams as streams_mod
from .activity import force, settle_drain_phase
from .adapters import add_drain_blocked, end_speech, start_tasks, transcript_timeout
from .bounded_close import CLOSE_ATTR, BoundedClose, closing_of
from .completion import disarm_when_done, finish, finish_now
from .locks import free_within
from .ownership import activities_of, note_started, outputs_of
from .patch_table import PATCHES
from .report import logger

Method = Callable[..., Coroutine[Any, Any, Any]]

#: session attributes: a forced request made before the graceful close it escalates opened;
#: the unrecoverable errors counted during a close, by the closing task they were seen in
FORCED_ATTR = "_safeclose_forced_request"
ERRORS_ATTR = "_safeclose_close_errors"
#: ``(closing task, when)``: the closing task upstream made for a request, not yet run
REQUESTED_ATTR = "_safeclose_close_requested"

_ONE_ARG = inspect.Signature([inspect.Parameter("event", inspect.Parameter.POSITIONAL_OR_KEYWORD)])


def _label(session: Any) -> Callable[[], str]:
    """The session's name in the report, made only when a report is built."""
    agent, sid = session.__dict__.get("_agent"), id(session)

    def label() -> str:
        name = (getattr(agent, "label", None) or type(agent).__name__) if agent is not None else "-"
        return f"AgentSession@{sid:x}[{name}]"

    return label


def _nothing_to_close(session: Any) -> bool:
    """Never started, or already closed, and not starting: upstream's close is a no-op
    there, and a new close would only overwrite the last close's report."""
    return not session._started and session._activity is None and not session._lock.locked()


def wrap_aclose_impl(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``AgentSession._aclose_impl``: every close path joins one
    shared closing task, awaited shielded, so a caller cancelled from outside (the job's
    ``wait_for`` guard) or a tool awaiting its own session's close cannot cancel it."""

    @functools.wraps(original)
    async def _aclose_impl(self: Any, *, reason: Any, drain: bool = False, error: Any = None) -> None:
        options = options_mod.for_session(self)
        if options is None:
            await original(self, reason=reason, drain=drain, error=error)
            return
        close = closing_of(self)
        if close is None:
            if _nothing_to_close(self):
                return
            close = _open_close(self, options, original, reason=reason, drain=drain, error=error)
        elif not drain:
            close.escalate()
        assert close.task is not None
        me = asyncio.current_task()
        _exempt_caller(self, close, me)
        try:
            await asyncio.shield(close.task)
        finally:
            if me is not None:
                close.waiters.discard(me)
                _disarm_after(self, me)

    return _aclose_impl


def wrap_close_soon(original: Callable[..., None], _options: Any) -> Callable[..., None]:
    """Patch-table factory for ``AgentSession._close_soon``: a forced request escalates a
    graceful close in flight; then upstream's body runs (its closing task joins the shared
    close, which resets it when it ends)."""

    @functools.wraps(original)
    def _close_soon(self: Any, *, reason: Any, drain: bool = False, error: Any = None) -> None:
        if options_mod.for_session(self) is not None:
            close = closing_of(self)
            if close is None and _nothing_to_close(self):
                return  # closed already: no task that would only overwrite the report
            if not drain:
                _forced_request(self, close, "forced close")
        opened = self._closing_task
        original(self, reason=reason, drain=drain, error=error)
        _note_request(self, opened)

    return _close_soon


def wrap_on_error(original: Callable[..., None], _options: Any) -> Callable[..., None]:
    """Patch-table factory for ``AgentSession._on_error``. Upstream ignores every error
    once a closing task exists, so a provider that dies during a graceful close (its
    goodbye can no longer play) left the close waiting for ``graceful_timeout``: an error
    that would have closed the session (past ``max_unrecoverable_errors`` of its kind
    during this close) is a forced request, and escalates it."""

    @functools.wraps(original)
    def _on_error(self: Any, error: Any) -> None:
        closing = self._closing_task
        recoverable = getattr(error, "recoverable", True)
        if options_mod.for_session(self) is not None and closing is not None and not recoverable:
            seen, counts = self.__dict__.get(ERRORS_ATTR, (None, None))
            if seen is not closing or counts is None:
                counts = collections.Counter()
                self.__dict__[ERRORS_ATTR] = (closing, counts)
            kind = getattr(error, "type", type(error).__name__)
            counts[kind] += 1
            tolerated = getattr(self.conn_options, "max_unrecoverable_errors", 0)
            if counts[kind] > tolerated:
                _forced_request(self, closing_of(self), "unrecoverable error")
        original(self, error)
        _note_request(self, closing)

    return _on_error


def _note_request(session: Any, before: Any) -> None:
    """Upstream just made a closing task (it was ``before``): its close, opened when the
    task first runs, is bounded from now."""
    task = session._closing_task
    if task is not None and task is not before:
        session.__dict__[REQUESTED_ATTR] = (task, time.monotonic())


def _forced_request(session: Any, close: BoundedClose | None, by: str) -> None:
    """A forced request escalates the graceful close in flight, or the one about to open:
    ``shutdown()`` only created its task, whose close opens a loop turn later."""
    if close is not None:
        close.escalate(by)
    elif session._closing_task is not None and not session._closing_task.done():
        session.__dict__[FORCED_ATTR] = (session._closing_task, by, time.monotonic())


def wrap_start(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``AgentSession.start``. The session is noted as started
    (weakly: closing a session with ``close_models`` spares a model another running session
    uses). A close that interrupts ``start()`` cancels what it waits on; ``start()`` then
    returns ``None`` once that close has ended (the close event was emitted, the session
    holds no activity), instead of raising the close's cancellation into the caller."""

    @functools.wraps(original)
    async def start(self: Any, *args: Any, **kwargs: Any) -> Any:
        if options_mod.for_session(self) is None:
            return await original(self, *args, **kwargs)
        patching.catch_up(PATCHES)  # rows waiting for the `mcp` extra: its servers spawn in start()
        note_started(self)
        try:
            return await original(self, *args, **kwargs)
        except asyncio.CancelledError:
            close = closing_of(self, live_only=False)
            me = asyncio.current_task()
            cancelling = getattr(me, "cancelling", None)
            if close is None or not close.interrupted_start or (cancelling is not None and cancelling()):
                raise  # the caller itself was cancelled: not ours to swallow
            logger.warning("the session was closed while it was starting; start() returns without a session")
            if close.task is not None and me is not None:
                close.waiters.add(me)  # waits for the close: never its target
                try:
                    await asyncio.shield(close.task)
                finally:
                    close.waiters.discard(me)
            return None

    return start


def _open_close(
    session: Any, options: Any, original: Method, *, reason: Any, drain: bool, error: Any
) -> BoundedClose:
    """Start the session's one closing task."""
    transcript = transcript_timeout(session)
    task, requested_at = session.__dict__.pop(REQUESTED_ATTR, (None, None))
    close = BoundedClose(
        session_label=_label(session),
        options=options,
        reason=str(getattr(reason, "value", reason)),
        graceful=drain,
        transcript_timeout=transcript,
        requested_at=requested_at if task is not None and task is asyncio.current_task() else None,
    )
    task, by, at = session.__dict__.pop(FORCED_ATTR, (None, "", None))
    if task is not None and task is session._closing_task:
        close.escalate(by, at)  # a forced request came before this graceful close opened
    # a close that interrupts start() still ends with a close event
    close.was_started = bool(session._started) or session._lock.locked()
    session.__dict__[CLOSE_ATTR] = close
    for act in activities_of(session):
        close.touch(act)
    for sink in outputs_of(session):
        close.io_objects.add(sink)
    close.task = asyncio.create_task(
        _closing_main(session, close, original, reason=reason, drain=drain, error=error),
        name="safeclose.AgentSession.close",
    )
    return close


def _exempt_caller(session: Any, close: BoundedClose, me: asyncio.Task[Any] | None) -> None:
    """A tool (or speech) awaiting the close must not be waited for by the close: that is
    an await cycle. Upstream's drain-blocked set is made for exactly this."""
    if me is None or me is close.task:
        return
    close.waiters.add(me)
    from livekit.agents.voice.agent import _get_activity_task_info
    from livekit.agents.voice.agent_activity import _AgentActivityContextVar

    activity = _AgentActivityContextVar.get(None)
    if activity is None or activity._session is not session or activity._closed:
        return
    add_drain_blocked(activity, [me])
    # its speech can only end after the close: interrupted (as the close would) and, for the
    # close's own waits on it, done, as upstream's interruption timeout would mark it
    info = _get_activity_task_info(me)
    end_speech(info.speech_handle if info is not None else None)


def _disarm_after(session: Any, me: asyncio.Task[Any]) -> None:
    """A tool that awaited its own session's close resumes after it; the end of its speech
    re-arms upstream's user-away timer on the closed session, which would pin it for 15 s.
    Only speech tasks get the callback, holding the session weakly: a manager task that
    closes many sessions must not keep them alive."""
    from livekit.agents.voice.agent import _get_activity_task_info

    info = _get_activity_task_info(me)
    handle = info.speech_handle if info is not None else None
    if handle is not None:
        disarm_when_done(session, [me, *handle._tasks])


async def _closing_main(
    session: Any, close: BoundedClose, original: Method, *, reason: Any, drain: bool, error: Any
) -> None:
    """The body of the shared closing task: upstream's close, watched, and the completion
    in a ``finally`` that outside cancellation cannot skip."""

    def _on_close(_: Any) -> None:
        close.close_emitted = True
        close.enter_phase("after")

    # upstream's EventEmitter reads every listener's signature on every emit: given, it is free
    setattr(_on_close, "__signature__", _ONE_ARG)  # noqa: B010
    session.on("close", _on_close)
    try:
        if await _wait_for_start(session, close):
            for act in activities_of(session):
                close.touch(act)
        # matched now, while the parts that made them are reachable: a recognition close the
        # close cuts short drops its STT pipeline before that pipeline's stream has ended
        streams_mod.streams_of(session)
        close.upstream = close.watch(original(session, reason=reason, drain=drain, error=error))
        await _watch(session, close)
    finally:
        # a close with nothing left to do ends in place; any other, in a task of its own
        # that outside cancellation cannot cut short
        if not finish_now(session, close, _on_close):
            await asyncio.shield(finish(session, close, reason=reason, error=error, on_close=_on_close))


async def _watch(session: Any, close: BoundedClose) -> None:
    """Wait for upstream's close phase by phase; act when a phase's bound passes."""
    upstream = close.upstream
    assert upstream is not None
    while not upstream.done():
        if await close.wait_phase(upstream):
            break
        if close.phase == "drain":
            acts = list(close.activities) + [a for a in activities_of(session) if a not in close.activities]
            if await settle_drain_phase(close, acts, upstream):
                continue
        close.abandoned_in = close.phase
        close.escalate("close_timeout")  # a graceful close cut at its bound is a forced one now
        close.abandon(f"AgentSession._aclose_impl ({close.phase})", upstream, close.t0)
        return
    if not upstream.cancelled() and (exc := upstream.exception()) is not None:
        logger.error("error while closing the session", exc_info=exc)


async def _wait_for_start(session: Any, close: BoundedClose) -> bool:
    """Closing while ``start()`` holds the session lock (toolset setup, ``on_enter`` of a
    captured run): wait within the drain bound, then cancel what start() waits on. True
    when it waited (the session's activities may have changed since the close opened)."""

    async def in_drain_bound(fut: asyncio.Future[Any]) -> bool:
        return await close.wait_phase(fut, drain=True)

    lock = session._lock
    if not lock.locked():
        return False
    if await free_within(lock, in_drain_bound):
        return True
    start = time.monotonic()
    close.interrupted_start = True
    close.cancel(start_tasks(session))
    for act in activities_of(session):
        force(close, act)
    close.record("session.start", start, "timeout", "start() still running at the drain bound")
    close.cut_drain()
    await free_within(lock, in_drain_bound)
    return True
