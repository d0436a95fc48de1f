"""``BackgroundAudioPlayer`` (``livekit.agents.voice.background_audio``) owned by its session.

Upstream ties a player to a session only through ``start(room=, agent_session=)``: the player
listens to the session's agent state (thinking sounds) but nothing closes it when the session
closes, so its mixer, its audio source and every play task (a looped ambient sound) outlive the
close. And its own ``aclose()`` snapshots the play tasks before it stops the mixer: a
``play()`` landing in between (a thinking sound on a state change, user code) starts a task
that nothing ever ends.

Here a player started with ``agent_session=`` is noted with that session, and closing the
session closes it (:func:`finish`, one of ``completion.FINISHERS``: bounded by one unwind
grace, then whatever still runs is cancelled and reported). From the moment a player closes
(the session's close or its own ``aclose()``) until it is started again, ``play()`` returns a
handle that is already done instead of starting a task.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from .bounded_close import BoundedClose
from .options import Options
from .report import logger

#: session -> the players started with ``agent_session=`` that session
_players: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
#: players closing or closed: ``play()`` starts nothing on them
_closing: weakref.WeakSet[Any] = weakref.WeakSet()


def players_of(session: Any) -> list[Any]:
    """The background audio players started with ``agent_session=session``."""
    return list(_players.get(session, ()))


def _done_handle() -> Any:
    from livekit.agents.voice.background_audio import PlayHandle

    handle = PlayHandle()
    handle._mark_playout_done()
    return handle


def wrap_start(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``BackgroundAudioPlayer.start``: the player is noted with its
    ``agent_session`` (closed with it) and may play again."""

    @functools.wraps(original)
    async def start(self: Any, *args: Any, **kwargs: Any) -> None:
        _closing.discard(self)
        await original(self, *args, **kwargs)
        session = kwargs.get("agent_session")
        if session is not None and hasattr(session, "emit"):  # NOT_GIVEN is falsy, not a session
            _players.setdefault(session, weakref.WeakSet()).add(self)

    return start


def wrap_aclose(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``BackgroundAudioPlayer.aclose``: no ``play()`` starts a task
    once the close began (a cancelled close leaves the player playing, as upstream)."""

    @functools.wraps(original)
    async def aclose(self: Any) -> None:
        _closing.add(self)
        try:
            await original(self)
        except asyncio.CancelledError:
            if getattr(self, "_mixer_atask", None) is not None:
                _closing.discard(self)
            raise

    return aclose


def wrap_play(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``BackgroundAudioPlayer.play``: a done handle, and no task, on
    a player that is closing or closed."""

    @functools.wraps(original)
    def play(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self in _closing:
            logger.debug("background audio: play() on a closing player ignored")
            return _done_handle()
        return original(self, *args, **kwargs)

    return play


def _running_tasks(player: Any) -> list[asyncio.Task[Any]]:
    tasks = list(getattr(player, "_play_tasks", None) or ())
    mixer = getattr(player, "_mixer_atask", None)
    if mixer is not None:
        tasks.append(mixer)
    return [t for t in tasks if isinstance(t, asyncio.Task) and not t.done()]


def finish(session: Any, close: BoundedClose) -> Coroutine[Any, Any, None] | None:
    """Close the session's background audio players (bounded: one unwind grace); cancel what
    still runs after that and record it in the close report. ``None`` when it has none."""
    players = [p for p in players_of(session) if p not in _closing or _running_tasks(p)]
    return _close_players(close, players) if players else None


async def _close_players(close: BoundedClose, players: list[Any]) -> None:
    start = time.monotonic()
    for p in players:
        _closing.add(p)
    closers = [asyncio.ensure_future(p.aclose()) for p in players]
    await asyncio.wait(closers, timeout=close.left(close.grace()))
    for c in closers:
        if not c.done():
            c.cancel()
        elif not c.cancelled() and c.exception() is not None:
            logger.warning("background audio: aclose() raised %r", c.exception())
    left = [t for p in players for t in _running_tasks(p)]
    live = close.cancel(left)
    if live:
        await asyncio.wait(live, timeout=close.left(close.grace()))
    stuck = close.mark_zombies([t for t in live if not t.done()])
    detail = f"{len(players)} player(s)" + (f"; {len(left)} task(s) cancelled" if left else "")
    close.record("background_audio.close", start, "timeout" if stuck else "done", detail)
