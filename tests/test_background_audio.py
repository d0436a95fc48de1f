"""``BackgroundAudioPlayer`` on a real AgentSession: the real player, its real ``rtc.AudioMixer``
and ``rtc.AudioSource`` (FFI), a looped built-in ambient clip decoded from the wheel, started on
upstream's console-mode room (``livekit.agents.ipc.mock_room``: no room server; the track
"publish" is the mock's). What is not covered here: unpublishing from a real room.

Vanilla: closing the session leaves the player's mixer and play tasks running, and a
``play()`` racing the player's own ``aclose()`` starts a task nothing ever ends. With the layer
the session's close closes the player, and a ``play()`` racing either close starts nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import Agent
from livekit.agents.ipc.mock_room import create_mock_room
from livekit.agents.voice.background_audio import BackgroundAudioPlayer, BuiltinAudioClip

import livekit_safeclose as lsc
from livekit_safeclose.testing._runs import LayerForRun, cancel_since, tasks_since
from livekit_safeclose.testing.scenarios.agents import Ctx
from livekit_safeclose.testing.scenarios.runner import make_session

AMBIENT = BuiltinAudioClip.OFFICE_AMBIENCE
BLIP = BuiltinAudioClip.KEYBOARD_TYPING


def _player_tasks(before: set[asyncio.Task[Any]]) -> list[str]:
    """The running tasks of the player and its mixer, by coroutine name."""
    names = [getattr(t.get_coro(), "__qualname__", "") for t in tasks_since(before)]
    return sorted(n for n in names if n.startswith(("BackgroundAudioPlayer.", "AudioMixer.")))


async def _started(ctx: Ctx) -> tuple[Any, BackgroundAudioPlayer]:
    session = make_session(ctx)
    await session.start(Agent(instructions="test"))
    player = BackgroundAudioPlayer(ambient_sound=AMBIENT, thinking_sound=BLIP)
    await player.start(room=create_mock_room(), agent_session=session)
    await asyncio.sleep(0.3)  # the ambient clip is playing
    return session, player


async def _run(patched: bool, race: str) -> dict[str, Any]:
    layer = LayerForRun(patched, drain_timeout=0.5, close_timeout=2.0)
    before = set(asyncio.all_tasks())
    ctx = Ctx()
    try:
        session, player = await _started(ctx)
        playing = _player_tasks(before)
        handles = []
        closer = asyncio.ensure_future(player.aclose() if race == "player" else session.aclose())
        # play() while the close runs: on every loop turn of the player's short close, every
        # 20 ms of the session's (each play decodes a clip)
        pause = 0.0 if race == "player" else 0.02
        while not closer.done():
            try:
                handles.append(player.play(BLIP))
            except RuntimeError:  # upstream: "BackgroundAudio is not started"
                pass
            await asyncio.sleep(pause)
        await closer
        if race == "player":
            await session.aclose()
        await asyncio.sleep(0.3)
        return {
            "playing": playing,
            "left": _player_tasks(before),
            "plays": len(handles),
            "undone": sum(not h.done() for h in handles),
            "mixer_running": player._mixer_atask is not None,
            "report": lsc.last_close_report(session) if patched else None,
        }
    finally:
        ctx.ledger.release()
        await cancel_since(before)
        layer.restore()


@pytest.mark.vanilla
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_vanilla_session_close_leaves_the_player_playing() -> None:
    out = await _run(False, race="session")
    assert "BackgroundAudioPlayer._play_task" in out["playing"], out
    assert out["mixer_running"], out
    assert "BackgroundAudioPlayer._run_mixer_task" in out["left"], out
    assert "BackgroundAudioPlayer._play_task" in out["left"], out


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_layer_session_close_stops_the_player() -> None:
    out = await _run(True, race="session")
    report = out["report"]
    assert "BackgroundAudioPlayer._play_task" in out["playing"], out
    assert out["left"] == [] and not out["mixer_running"], out
    assert out["undone"] == 0, out  # plays racing the close got done handles
    assert report is not None and any(s.name == "background_audio.close" for s in report.steps), report


@pytest.mark.vanilla
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_vanilla_play_racing_player_aclose_leaves_a_task() -> None:
    out = await _run(False, race="player")
    assert not out["mixer_running"], out  # the player did close
    assert "BackgroundAudioPlayer._play_task" in out["left"] and out["undone"] > 0, out


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_layer_play_racing_player_aclose_starts_nothing() -> None:
    out = await _run(True, race="player")
    assert out["plays"] > 0 and out["undone"] == 0, out
    assert out["left"] == [] and not out["mixer_running"], out


# -- the clip a close stops mid-decode -------------------------------------------------------
# Upstream's player close cancels its play tasks and leaves each clip's generator to the loop's
# async-generator finalizer, a task nobody awaits, which waits for the decoder thread. A clip
# still decoding when the close comes (the first ~0.2 s of each pass of the built-in clip; on
# 1.6.1-1.6.10, whose session close is fast, that is where the session's close lands) is then
# still being closed after the close returned. A 60 s Ogg/Opus clip (about 1 s to decode) makes
# the window wide and the test deterministic on every release.


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """60 s of a quiet tone, Ogg/Opus, encoded with PyAV (the decoder's own library)."""
    import av
    import numpy as np

    path = tmp_path_factory.mktemp("clips") / "long.ogg"
    n, rate = 960, 48000
    with av.open(str(path), "w") as out:
        stream: Any = out.add_stream("libopus", rate=rate, layout="mono")
        for i in range(60 * rate // n):
            t = (np.arange(n) + i * n) / rate
            frame = av.AudioFrame.from_ndarray(
                (3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).reshape(1, -1),
                format="s16",
                layout="mono",
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


async def _close_mid_decode(patched: bool, clip: str) -> dict[str, Any]:
    layer = LayerForRun(patched, drain_timeout=0.5, close_timeout=2.0)
    before = set(asyncio.all_tasks())
    ctx = Ctx()
    try:
        session = make_session(ctx)
        await session.start(Agent(instructions="test"))
        player = BackgroundAudioPlayer(ambient_sound=clip)
        await player.start(room=create_mock_room(), agent_session=session)
        await asyncio.sleep(0.2)  # playing, the clip about a fifth decoded
        await session.aclose()
        await asyncio.sleep(0)
        return {"left": [getattr(t.get_coro(), "__qualname__", "?") for t in tasks_since(before)]}
    finally:
        ctx.ledger.release()
        await cancel_since(before)
        layer.restore()


@pytest.mark.vanilla
@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_vanilla_session_close_leaves_the_clip_decoding(long_clip: str) -> None:
    out = await _close_mid_decode(False, long_clip)
    assert "BackgroundAudioPlayer._play_task" in out["left"], out  # the clip plays on


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_layer_session_close_closes_the_clip_mid_decode(long_clip: str) -> None:
    # without the clip rows (the player closed, its clip left to the loop's finalizer) one
    # task is still closing the clip here
    out = await _close_mid_decode(True, long_clip)
    assert out["left"] == [], out
