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

Attribution is lazy: a stream made inside a speech task (TTS, LLM) knows its session from
upstream's activity context variable at once; one made elsewhere (the STT stream, opened by
the recognition pump) only remembers the task that made it, and is matched to a session by
that task's await chain when someone asks for the session's streams. A stream made by
another stream's main task (a ``FallbackAdapter``'s inner and recovery streams) works for
that stream's session, and is given it at creation: by then the STT pump that made the
outer stream may be gone. Only that rare case walks frames at creation.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics, stacks
from .ownership import noted_sessions, objects_of

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

    @property
    def session(self) -> Any:
        return self.session_ref() if self.session_ref is not None else None

    @property
    def label(self) -> str:
        return f"{self.kind}:{type(self.stream).__name__}@{id(self.stream):x}"


_open: dict[int, OpenStream] = {}
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
    if owner is None and current is not None:
        owner = _parent_session(current)
    _track(stream, kind, task, owner, current if owner is None else None)


def _track(
    stream: Any, kind: str, task: asyncio.Task[Any], owner: Any, creator: asyncio.Task[Any] | None
) -> None:
    if owner is not None:
        _sessions.add(owner)
    key = id(stream)
    fresh = key not in _open
    _open[key] = OpenStream(
        stream,
        kind,
        task,
        weakref.ref(owner) if owner is not None else None,
        weakref.ref(creator) if creator is not None else None,
    )
    if fresh:
        metrics.stream_opened(kind)

    def _closed(_: asyncio.Task[Any], key: int = key, stream: Any = stream) -> None:
        entry = _open.get(key)
        if entry is not None and entry.stream is stream:
            del _open[key]
            metrics.stream_closed(entry.kind)

    task.add_done_callback(_closed)


def _parent_session(task: asyncio.Task[Any]) -> Any:
    """The session of the open stream whose main task is ``task``, if any."""
    for entry in list(_open.values()):
        if entry.task is task:
            return session_of(entry.stream)
    return None


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
    """Give ``session`` the unattributed open streams it holds (a realtime session is an
    activity's own part) or whose creator works for it."""
    orphans = [e for e in list(_open.values()) if e.session_ref is None]
    if not orphans:
        return
    acts = _activities_of_close(session)
    orphans = [e for e in orphans if not _made_by_recognition(e, session, acts)]
    if not orphans:
        return
    owned = objects_of(session, acts)
    for entry in orphans:
        creator = entry.creator() if entry.creator is not None else None
        if id(entry.stream) in owned or (
            creator is not None and not creator.done() and stacks.works_for(creator, owned)
        ):
            entry.session_ref = weakref.ref(session)
            _sessions.add(session)


def _made_by_recognition(entry: OpenStream, session: Any, acts: list[Any]) -> bool:
    """The common case, decided from the creator's outermost frames (a decorator's wrapper
    may come first): the stream was made by a method of the session's own audio recognition
    or its STT pipeline (the STT pump). Then it is given the session."""
    creator = entry.creator() if entry.creator is not None else None
    if creator is None or creator.done():
        return False
    parts = []
    for act in [*acts, session._activity]:
        recognition = getattr(act, "_audio_recognition", None)
        if recognition is not None:
            parts += [recognition, getattr(recognition, "_stt_pipeline", None)]
    for frame in itertools.islice(stacks.frames(creator, into_tasks=False), 3):
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            maker = frame.f_locals.get("self")
            if any(maker is p for p in parts if p is not None):
                entry.session_ref = weakref.ref(session)
                _sessions.add(session)
                return True
    return False


def _activities_of_close(session: Any) -> list[Any]:
    from .bounded_close import closing_of

    close = closing_of(session, live_only=False)
    return list(close.activities) if close is not None else []


def streams_of(session: Any) -> list[OpenStream]:
    """The open streams of ``session``."""
    _attribute(session)
    return [e for e in list(_open.values()) if e.session is session]


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
