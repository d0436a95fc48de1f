"""A process-wide ledger of open provider streams (STT, TTS, LLM) and realtime sessions.

A stream counts as open while its main task runs: that task owns the provider
connection, so "main task done" is exactly "the provider saw the connection end". A
realtime session (``llm.RealtimeSession``) counts the same way: its main task is the one
its plugin keeps as ``_main_atask``, or else the task found working on its behalf right
after it was made (the base class's ``__init__`` runs before the plugin's starts it, so
the session is registered one loop turn later).
Registering costs one dict insert, one context-variable read and one done-callback per
stream, cheap enough to leave on in production. The ledger is also how a forced close finds
the streams of *its* session that are still open and stops them.

Attribution happens when the stream opens, so a close never walks a stack to find its
streams, and a process holding many sessions pays nothing per close for the others' streams:

* a stream made inside a speech task (TTS, LLM) knows its session from upstream's activity
  context variable;
* a stream made by another stream's main task (a ``FallbackAdapter``'s inner and recovery
  streams) works for that stream's session: by then the STT pump that made the outer stream
  may be gone;
* one made elsewhere (the STT stream, opened by the recognition pump) is given the session
  whose audio recognition, or STT pipeline, is the ``self`` of one of the creating task's
  outermost frames (its *makers*, read from the running stack as the stream opens); the
  session a maker names is asked first, so an open costs the same however many sessions the
  process holds. A stream no session claims then is an *orphan*, matched when someone asks
  for a session's streams: by its makers first, else by its creator's await chain.

Each session's streams are indexed, so asking for them costs what the session has open.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from . import metrics, stacks
from .ownership import activities_of, handed_over, is_noted, noted_sessions, objects_of

#: the stream base classes the ledger wraps, and the kind each counts as
KINDS: dict[str, str] = {
    "RecognizeStream": "stt",
    "SynthesizeStream": "tts",
    "ChunkedStream": "tts",
    "LLMStream": "llm",
    "RealtimeSession": "realtime",
}

#: every kind :func:`open_streams` counts
COUNTED: tuple[str, ...] = ("stt", "tts", "llm", "realtime")


@dataclass
class OpenStream:
    stream: Any
    kind: str
    task: asyncio.Task[Any]
    session_ref: weakref.ReferenceType[Any] | None
    creator: weakref.ReferenceType[asyncio.Task[Any]] | None
    #: the ``self`` of the creator's outermost frames as the stream opened (orphans only)
    makers: tuple[weakref.ReferenceType[Any], ...] = ()

    @property
    def session(self) -> Any:
        return self.session_ref() if self.session_ref is not None else None

    @property
    def label(self) -> str:
        return f"{self.kind}:{type(self.stream).__name__}@{id(self.stream):x}"


_open: dict[int, OpenStream] = {}
#: the open streams by main task: a stream made inside one works for that stream's session
_by_task: dict[asyncio.Task[Any], OpenStream] = {}
#: the open streams no session has claimed yet (keys as in ``_open``)
_orphans: dict[int, OpenStream] = {}
#: per session, its open streams (keys as in ``_open``)
_by_session: weakref.WeakKeyDictionary[Any, dict[int, OpenStream]] = weakref.WeakKeyDictionary()
# sessions that opened a stream: whom a model instance may be shared with
_sessions: weakref.WeakSet[Any] = weakref.WeakSet()
_context_var: Any = None


def main_task(stream: Any) -> asyncio.Task[Any] | None:
    """The task that owns the stream's provider connection."""
    task: asyncio.Task[Any] | None = getattr(stream, "_task", None) or getattr(
        stream, "_synthesize_task", None
    )
    return task


def _speech_session() -> Any:
    """The session whose speech task (or a child of one) is running, if any."""
    global _context_var
    if _context_var is None:
        from livekit.agents.voice.agent_activity import _AgentActivityContextVar

        _context_var = _AgentActivityContextVar
    activity = _context_var.get(None)
    return activity._session if activity is not None else None


def register(stream: Any, kind: str, session: Any = None) -> None:
    """Track ``stream`` until its main task ends."""
    task = main_task(stream)
    if task is None or task.done():
        return
    owner = session if session is not None else _speech_session()
    current = asyncio.current_task()
    makers: tuple[weakref.ReferenceType[Any], ...] = ()
    if owner is None and current is not None:
        owner = _parent_session(current)
        if owner is None:
            makers = _makers(current)
            owner = _claimant(makers)
    _track(stream, kind, task, owner, current if owner is None else None, makers)


def _track(
    stream: Any,
    kind: str,
    task: asyncio.Task[Any],
    owner: Any,
    creator: asyncio.Task[Any] | None,
    makers: tuple[weakref.ReferenceType[Any], ...] = (),
) -> None:
    key = id(stream)
    old = _open.get(key)
    if old is not None:
        _forget(key, old)
    entry = _open[key] = OpenStream(
        stream, kind, task, None, weakref.ref(creator) if creator is not None else None, makers
    )
    _by_task[task] = entry
    if owner is not None:
        _give(entry, owner)
    else:
        _orphans[key] = entry
    if old is None:
        metrics.stream_opened(kind)

    def _closed(_: asyncio.Task[Any], key: int = key, stream: Any = stream) -> None:
        entry = _open.get(key)
        if entry is not None and entry.stream is stream:
            del _open[key]
            _forget(key, entry)
            metrics.stream_closed(entry.kind)

    task.add_done_callback(_closed)


def _give(entry: OpenStream, session: Any) -> None:
    """``entry``'s stream works for ``session`` from now on."""
    key = id(entry.stream)
    entry.session_ref = weakref.ref(session)
    _sessions.add(session)
    _orphans.pop(key, None)
    _by_session.setdefault(session, {})[key] = entry


def _forget(key: int, entry: OpenStream) -> None:
    """``entry`` is no longer an open stream (it ended, or the same object was re-registered)."""
    _orphans.pop(key, None)
    if _by_task.get(entry.task) is entry:
        del _by_task[entry.task]
    owner = entry.session
    if owner is not None:
        mine = _by_session.get(owner)
        if mine is not None and mine.get(key) is entry:
            del mine[key]
            if not mine:
                del _by_session[owner]


def _makers(task: asyncio.Task[Any]) -> tuple[weakref.ReferenceType[Any], ...]:
    """The ``self`` of the outermost frames (a decorator's wrapper may come first) of the
    running ``task``, read from the running stack: a running coroutine's await chain is
    not readable from the task until it suspends."""
    root = getattr(task.get_coro(), "cr_frame", None)
    chain: list[FrameType] = []
    at: FrameType | None = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if at is None:
            return ()
        chain.append(at)
        if at is root:
            break
        at = at.f_back
    else:
        return ()
    out: list[weakref.ReferenceType[Any]] = []
    for frame in itertools.islice(reversed(chain), 3):
        code = frame.f_code
        if stacks.hidden(code):
            continue
        if code.co_argcount and code.co_varnames[0] == "self":
            try:
                out.append(weakref.ref(frame.f_locals["self"]))
            except (KeyError, TypeError):
                continue
    return tuple(out)


#: how far up the running stack :func:`_makers` looks for the creating task's root frame
_MAX_FRAMES = 64


def _claimant(makers: tuple[weakref.ReferenceType[Any], ...]) -> Any:
    """The noted session one of ``makers`` is a recognition part of, if any. The sessions
    the makers name are asked first, so a stream opening costs the same however many
    sessions the process holds; every other noted session only when none of those claims it."""
    objs = [o for m in makers if (o := m()) is not None]
    if not objs:
        return None
    named = [s for o in objs for s in _named_sessions(o)]
    for session in named:
        if _makes_for(session, objs):
            return session
    return next((s for s in noted_sessions() if s not in named and _makes_for(s, objs)), None)


def _makes_for(session: Any, objs: list[Any]) -> bool:
    """One of ``objs`` is a recognition part of ``session``."""
    parts = _recognition_parts(session, _activities_of_close(session))
    return any(o is p for o in objs for p in parts)


def _named_sessions(part: Any) -> list[Any]:
    """The noted sessions ``part`` names: an audio recognition's ``_session``, an STT
    pipeline's ``_is_closing`` (upstream passes the session's own bound method). Only a
    hint, read with defaults: the caller checks the part is really that session's."""
    hints = (getattr(part, "_session", None), getattr(getattr(part, "_is_closing", None), "__self__", None))
    return [s for s in hints if s is not None and is_noted(s)]


def _parent_session(task: asyncio.Task[Any]) -> Any:
    """The session of the open stream whose main task is ``task``, if any."""
    entry = _by_task.get(task)
    return session_of(entry.stream) if entry is not None else None


def entry_of(obj: Any) -> OpenStream | None:
    """The ledger's entry for ``obj`` while it is an open stream, else None."""
    entry = _open.get(id(obj))
    return entry if entry is not None and entry.stream is obj else None


def session_of(stream: Any) -> Any:
    """The session the open ``stream`` works for (matched now if it was not yet), or None."""
    entry = entry_of(stream)
    if entry is None:
        return None
    if entry.session is None:
        for session in noted_sessions():
            _attribute(session)
            if entry.session is not None:
                break
    return entry.session


def _attribute(session: Any) -> None:
    """Give ``session`` the orphans it holds (a realtime session is an activity's own part),
    whose makers are its recognition parts, or whose creator works for it; an orphan whose
    makers another session now claims is given to that one."""
    if not _orphans:
        return
    acts = _activities_of_close(session)
    parts = _recognition_parts(session, acts)
    rest: list[OpenStream] = []
    for entry in list(_orphans.values()):
        if entry.makers and any(m() is p for m in entry.makers for p in parts):
            _give(entry, session)
        elif entry.makers and (other := _claimant(entry.makers)) is not None:
            _give(entry, other)  # another session's: no reason to walk its creator's chain
        else:
            rest.append(entry)
    if not rest:
        return
    owned = objects_of(session, acts)
    for entry in rest:
        creator = entry.creator() if entry.creator is not None else None
        if id(entry.stream) in owned or (
            creator is not None and not creator.done() and stacks.works_for(creator, owned)
        ):
            _give(entry, session)


def _recognition_parts(session: Any, acts: list[Any]) -> list[Any]:
    """The session's audio recognitions and their STT pipelines (the makers of its STT
    streams), a pipeline a handoff carries included."""
    parts: list[Any] = list(handed_over(session))
    for act in [*acts, *activities_of(session)]:
        recognition = getattr(act, "_audio_recognition", None)
        if recognition is not None:
            parts.append(recognition)
            pipeline = getattr(recognition, "_stt_pipeline", None)
            if pipeline is not None:
                parts.append(pipeline)
    return parts


def _activities_of_close(session: Any) -> list[Any]:
    from .bounded_close import closing_of

    close = closing_of(session, live_only=False)
    return list(close.activities) if close is not None else []


def streams_of(session: Any) -> list[OpenStream]:
    """The open streams of ``session``."""
    _attribute(session)
    mine = _by_session.get(session)
    return list(mine.values()) if mine else []


def known_sessions() -> list[Any]:
    """Every session a stream was attributed to."""
    return list(_sessions)


def open_streams(session: Any = None) -> dict[str, int]:
    """Open streams by kind (``stt``, ``tts``, ``llm``, ``realtime``) and ``total``; for
    one session when given, else for the whole process."""
    entries = list(_open.values()) if session is None else streams_of(session)
    counts: Counter[str] = Counter(e.kind for e in entries)
    out = {k: counts.get(k, 0) for k in COUNTED}
    out["total"] = sum(counts.values())
    return out


def wrap_init(kind: str) -> Callable[[Any, Any], Any]:
    """A patch-table factory: the stream base class's ``__init__``, then ``register``."""

    def factory(original: Callable[..., None], _options: Any) -> Callable[..., None]:
        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            register(self, kind)

        return __init__

    return factory


stt_init = wrap_init("stt")
tts_init = wrap_init("tts")
llm_init = wrap_init("llm")


def realtime_main_task(rt: Any) -> asyncio.Task[Any] | None:
    """The task that owns a realtime session's provider connection: the plugin's
    ``_main_atask``, else the first live task whose await chain is one of its methods."""
    task = getattr(rt, "_main_atask", None)
    if isinstance(task, asyncio.Task):
        return task
    mine = {id(rt)}
    return next((t for t in asyncio.all_tasks() if not t.done() and stacks.works_for(t, mine)), None)


def _register_realtime(ref: weakref.ReferenceType[Any], creator: asyncio.Task[Any] | None) -> None:
    rt = ref()
    if rt is None or id(rt) in _open:
        return
    task = realtime_main_task(rt)
    if task is not None and not task.done():
        _track(rt, "realtime", task, None, creator)


def realtime_init(original: Callable[..., None], _options: Any) -> Callable[..., None]:
    """A patch-table factory: ``RealtimeSession.__init__``, then the session is registered
    one loop turn later, once the plugin's own ``__init__`` has started its main task."""

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # made outside a loop: it has no task to watch yet
        loop.call_soon(_register_realtime, weakref.ref(self), asyncio.current_task())

    return __init__


def installed() -> bool:
    """True while the ledger's rows of the patch table are applied."""
    from .patching import applied_parts

    return "stream_ledger" in applied_parts()
