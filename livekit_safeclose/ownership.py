"""Which objects work on a session's behalf.

The audit (what a closed session left running) and the stream ledger (which session a
stream belongs to) both answer "is this task working for that session?" by walking the
task's await chain for a frame whose ``self`` is one of these objects. Attributes that only
some releases have are read with a default: a missing one narrows the set, never fails.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

#: every session that called ``start()`` while the layer was installed (weak: a closed
#: session that nobody holds goes): whom a model instance may be shared with
_started_sessions: weakref.WeakSet[Any] = weakref.WeakSet()


#: per session, the parts a handoff carries from the old activity to the next (the STT
#: pipeline, the realtime session): while the handoff holds them they are in no activity,
#: and a close during the handoff makes it close them itself, outside the close's view
_handed_over: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def note_handed_over(session: Any, parts: Iterable[Any]) -> None:
    for part in parts:
        _handed_over.setdefault(session, weakref.WeakSet()).add(part)


def handed_over(session: Any) -> list[Any]:
    """The parts a handoff of ``session`` carries now (or carried last)."""
    parts = _handed_over.get(session)
    return list(parts) if parts else []


def note_started(session: Any) -> None:
    _started_sessions.add(session)


def is_noted(obj: Any) -> bool:
    """True when ``obj`` is a session noted by ``start()``."""
    return obj in _started_sessions  # a WeakSet: False for what cannot be weakly referenced


def noted_sessions() -> list[Any]:
    """Every session noted by ``start()`` that is still alive: started, starting (whose
    streams open before ``_started`` is set) or closed."""
    return list(_started_sessions)


def running_sessions() -> list[Any]:
    """The sessions that are started now."""
    return [s for s in list(_started_sessions) if s._started]


def activities_of(session: Any) -> list[Any]:
    """The session's current activity and, for an ``AgentTask``, the parents it returns
    to, plus a next activity a handoff is starting."""
    from livekit.agents.voice.agent import AgentTask

    out: list[Any] = []
    act = session._activity
    while act is not None and act not in out:
        out.append(act)
        agent = act.agent
        old = agent._old_agent if isinstance(agent, AgentTask) else None
        act = old._activity if old is not None else None
    nxt = session._next_activity
    if nxt is not None and nxt not in out:
        out.append(nxt)
    return out


def outputs_of(session: Any) -> list[Any]:
    """The session's audio and transcription outputs, with the sinks they chain to (a
    task waiting on a dead sink's playout runs on their behalf)."""
    out: list[Any] = []
    for head in (session.output.audio, session.output.transcription):
        sink = head
        while sink is not None and sink not in out:
            out.append(sink)
            sink = getattr(sink, "next_in_chain", None)
    return out


def sinks_held_by(task: Any) -> list[Any]:
    """The audio outputs a speech task plays into (its frames' locals): a sink replaced
    since (the caller hung up) is no output of the session any more, yet a playout wait
    on it was started by this speech."""
    from livekit.agents.voice import io

    from .stacks import frames

    seen: list[Any] = []
    for frame in frames(task):
        for value in list(frame.f_locals.values()):
            if isinstance(value, io.AudioOutput) and all(value is not s for s in seen):
                seen.append(value)
    return seen


def objects_of(session: Any, activities: Iterable[Any] = (), extra: Iterable[Any] = ()) -> set[int]:
    """Ids of the session, its activities (``activities`` plus the live ones), the parts of
    each activity that run tasks of their own, and ``extra`` objects."""
    acts = list(activities) + [a for a in activities_of(session) if a not in activities]
    objs: list[Any] = [session, *extra, *outputs_of(session), *_handed_over.get(session, ())]
    for act in acts:
        recognition = getattr(act, "_audio_recognition", None)
        objs += [
            act,
            act.agent,
            recognition,
            getattr(act, "_tool_executor", None),
            getattr(act, "_rt_session", None),
        ]
        # the turn detector's stream: its tasks outlive a recognition close that was abandoned
        objs += [
            getattr(recognition, "_stt_pipeline", None),
            getattr(recognition, "_turn_detector_stream", None),
        ]
    return {id(o) for o in objs if o is not None}
