"""A process-wide ledger of open provider streams (STT, TTS, LLM).

A stream counts as open while its main task runs: that task owns the provider
connection, so "main task done" is exactly "the provider saw the connection end".
Registering costs one dict insert and one done-callback per stream, cheap enough to
leave on in production. The ledger is also how a forced close finds the streams of
*its* session that are still open and stops them.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

_KINDS: dict[str, str] = {
    "RecognizeStream": "stt",
    "SynthesizeStream": "tts",
    "ChunkedStream": "tts",
    "LLMStream": "llm",
}


@dataclass
class OpenStream:
    stream: Any
    kind: str
    session_ref: weakref.ReferenceType[Any] | None

    @property
    def session(self) -> Any:
        return self.session_ref() if self.session_ref is not None else None

    @property
    def task(self) -> asyncio.Task[Any]:
        task = main_task(self.stream)
        assert task is not None
        return task

    @property
    def label(self) -> str:
        return f"{self.kind}:{type(self.stream).__name__}@{id(self.stream):x}"


_open: dict[int, OpenStream] = {}
# sessions that opened a stream: whom a model instance may be shared with
_sessions: weakref.WeakSet[Any] = weakref.WeakSet()
_originals: dict[type, Callable[..., None]] = {}


def _owner_session() -> Any:
    """The session creating the stream: the one whose speech task (or a child of one) runs,
    else the activity found in the calling frames (the STT stream is opened by the agent's
    ``stt_node`` inside the recognition pump, outside any speech task)."""
    from livekit.agents.voice.agent_activity import AgentActivity, _AgentActivityContextVar
    from livekit.agents.voice.agent_session import AgentSession

    activity = _AgentActivityContextVar.get(None)
    if activity is not None:
        return activity._session
    frame: FrameType | None = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            break
        local = frame.f_locals
        for key in ("activity", "self"):
            obj = local.get(key)
            if isinstance(obj, AgentActivity):
                return obj._session
            if isinstance(obj, AgentSession):
                return obj
        frame = frame.f_back
    return None


def main_task(stream: Any) -> asyncio.Task[Any] | None:
    """The task that owns the stream's provider connection."""
    task: asyncio.Task[Any] | None = getattr(stream, "_task", None) or getattr(
        stream, "_synthesize_task", None
    )
    return task


def register(stream: Any, kind: str, session: Any = None) -> None:
    """Track ``stream`` until its main task ends."""
    task = main_task(stream)
    if task is None or task.done():
        return
    key = id(stream)
    owner = session if session is not None else _owner_session()
    if owner is not None:
        _sessions.add(owner)
    _open[key] = OpenStream(stream, kind, weakref.ref(owner) if owner is not None else None)

    def _closed(_: asyncio.Task[Any], key: int = key, stream: Any = stream) -> None:
        entry = _open.get(key)
        if entry is not None and entry.stream is stream:
            del _open[key]

    task.add_done_callback(_closed)


def adopt(stream: Any, session: Any, kind: str = "stt") -> None:
    """Attribute a stream to ``session``: the STT stream is created outside any speech
    task, and without ``install()`` (the subclass) nothing registered it yet."""
    entry = _open.get(id(stream))
    if entry is None or entry.stream is not stream:
        register(stream, kind, session)
    elif entry.session_ref is None:
        entry.session_ref = weakref.ref(session)


def known_sessions() -> list[Any]:
    return list(_sessions)


def open_streams(session: Any = None) -> dict[str, int]:
    """Open streams by kind (``stt``, ``tts``, ``llm``) and ``total``; for one session
    when given, else for the whole process."""
    counts: Counter[str] = Counter()
    for entry in list(_open.values()):
        if session is None or entry.session is session:
            counts[entry.kind] += 1
    out = {k: counts.get(k, 0) for k in ("stt", "tts", "llm")}
    out["total"] = sum(counts.values())
    return out


def streams_of(session: Any) -> list[OpenStream]:
    return [e for e in list(_open.values()) if e.session is session]


def _make_init(cls: type, kind: str) -> Callable[..., None]:
    original = cls.__dict__["__init__"]

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        register(self, kind)

    return __init__


def _classes() -> dict[str, type]:
    from livekit.agents import llm, stt, tts

    return {
        "RecognizeStream": stt.RecognizeStream,
        "SynthesizeStream": tts.SynthesizeStream,
        "ChunkedStream": tts.ChunkedStream,
        "LLMStream": llm.LLMStream,
    }


def install() -> None:
    """Start tracking streams (patches the base classes' ``__init__``); idempotent."""
    for name, cls in _classes().items():
        if cls in _originals:
            continue
        _originals[cls] = cls.__dict__["__init__"]
        cls.__init__ = _make_init(cls, _KINDS[name])  # type: ignore[misc]


def uninstall() -> None:
    for cls, original in list(_originals.items()):
        cls.__init__ = original  # type: ignore[misc]
        del _originals[cls]


def installed() -> bool:
    return bool(_originals)
