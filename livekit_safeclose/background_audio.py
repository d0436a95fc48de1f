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

A player's close also closes the clips it was decoding. Upstream's close cancels the play
tasks and leaves each clip's ``audio_frames_from_file`` generator to the loop's async-generator
finalizer: a task nobody awaits, which waits for the decoder thread to wind down and so
outlives the close whenever a clip is still decoding (the first ~0.2 s of each pass of a
clip, which is where a fast close lands). Here every such generator is noted with its player
(:func:`wrap_audio_frames`) and the player's close awaits its close.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from .bounded_close import BoundedClose
from .options import Options
from .report import logger

#: session -> the players started with ``agent_session=`` that session
_players: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
#: players closing or closed: ``play()`` starts nothing on them
_closing: weakref.WeakSet[Any] = weakref.WeakSet()
#: player -> the clip generators (``audio_frames_from_file``) decoding on its behalf
_decodes: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()
#: the player a clip decoded here plays for: set while its ``__init__`` runs (the mixer task
#: it starts pulls the looped clips) and while its ``play()`` runs (the play task opens a
#: one-shot clip); tasks started then carry it in their context
_decoding_for: contextvars.ContextVar[weakref.ref[Any] | None] = contextvars.ContextVar(
    "livekit_safeclose_decoding_for", default=None
)


def players_of(session: Any) -> list[Any]:
    """The background audio players started with ``agent_session=session``."""
    return list(_players.get(session, ()))


def _done_handle() -> Any:
    from livekit.agents.voice.background_audio import PlayHandle

    handle = PlayHandle()
    handle._mark_playout_done()
    return handle


def wrap_init(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``BackgroundAudioPlayer.__init__``: the mixer task it starts
    carries the player, so the looped clips that task opens are noted with it."""

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        token = _decoding_for.set(weakref.ref(self))
        try:
            original(self, *args, **kwargs)
        finally:
            _decoding_for.reset(token)

    return __init__


def wrap_audio_frames(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for the ``audio_frames_from_file`` the player module calls: the
    generator (upstream's, unchanged) is noted with the player it decodes for."""

    @functools.wraps(original)
    def audio_frames_from_file(*args: Any, **kwargs: Any) -> Any:
        frames = original(*args, **kwargs)
        ref = _decoding_for.get()
        player = ref() if ref is not None else None
        if player is not None and hasattr(frames, "aclose"):
            _decodes.setdefault(player, weakref.WeakSet()).add(frames)
        return frames

    return audio_frames_from_file


#: how long a player's close waits for a clip whose read the close cancelled to wind down
#: (its decoder stops within milliseconds once its input is closed; a cap, so that a
#: player's own ``aclose()``, which has no close bound, never waits forever)
_WIND_DOWN_S = 1.0


def _is_open(frames: Any) -> bool:
    return getattr(frames, "ag_frame", None) is not None


def _at_yield(frames: Any) -> bool:
    """Suspended at a ``yield``: nothing is reading it, so closing it is the caller's job."""
    running = getattr(frames, "ag_running", False) or getattr(frames, "ag_await", None) is not None
    return _is_open(frames) and not running


def _open_decodes(player: Any) -> list[AsyncGenerator[Any, None]]:
    """The player's clip generators not finished yet (strong references: held from here on,
    none of them is left to the loop's finalizer)."""
    return [g for g in list(_decodes.get(player, ())) if _is_open(g)]


async def _close_decodes(decodes: list[AsyncGenerator[Any, None]]) -> None:
    """Close the clips the play tasks left suspended at a frame (each stops its decoder and
    waits for the decoder thread); a clip whose read the close cancelled unwinds in the
    reading task: wait for that (bounded by ``_WIND_DOWN_S``)."""
    idle = [g for g in decodes if _at_yield(g)]
    results = await asyncio.gather(*(g.aclose() for g in idle), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, RuntimeError):
            logger.debug("background audio: closing a clip raised %r", r)
    unwinding = [g for g in decodes if _is_open(g)]
    deadline = time.monotonic() + _WIND_DOWN_S
    while unwinding and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        unwinding = [g for g in unwinding if _is_open(g)]
    if unwinding:
        logger.debug("background audio: %d clip(s) still unwinding after the close", len(unwinding))


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
    once the close began (a cancelled close leaves the player playing, as upstream), and the
    close ends once the clips it stopped are closed."""

    @functools.wraps(original)
    async def aclose(self: Any) -> None:
        _closing.add(self)
        decodes = _open_decodes(self)  # before upstream's cancel drops the last references
        try:
            await original(self)
        except asyncio.CancelledError:
            if getattr(self, "_mixer_atask", None) is not None:
                _closing.discard(self)
            raise
        await _close_decodes(decodes)

    return aclose


def wrap_play(original: Callable[..., Any], _options: Options) -> Callable[..., Any]:
    """Patch-table factory for ``BackgroundAudioPlayer.play``: a done handle, and no task, on
    a player that is closing or closed."""

    @functools.wraps(original)
    def play(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self in _closing:
            logger.debug("background audio: play() on a closing player ignored")
            return _done_handle()
        token = _decoding_for.set(weakref.ref(self))
        try:
            return original(self, *args, **kwargs)
        finally:
            _decoding_for.reset(token)

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
