"""The STT retry budget across provider idle closes (inference error 2007), over real sockets.

Pins the upstream 1.8.9 behaviour the layer relies on instead of patching it:
  * an `error` frame (code 2007) on a live inference stream is retryable: the stream
    reconnects (a new server connection) without the session noticing;
  * `RecognizeStream._num_retries` is kept across reconnects and reset by a
    FINAL_TRANSCRIPT (livekit/agents/stt/stt.py, `_metrics_monitor_task`) or by an attempt
    that outlived `conn_options.timeout` (`_main_task`), so with max_retry=1 a long
    session survives any number of idle closes as long as the caller talks in between;
  * once the layer closed the session, nothing reconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT, MARGIN
from livekit.agents import APIConnectionError, APIConnectOptions, APIError, inference, stt
from livekit.agents.stt import STTError

from livekit_safeclose.testing.e2e import (
    E2EAgent,
    E2EContext,
    make_e2e_session,
    make_models,
    run_e2e_scenario,
)
from livekit_safeclose.testing.standins import IDLE_CLOSE_CODE, ProviderServer, tone_frames

IDLE = 0.3
KIND = "inference_stt"


@asynccontextmanager
async def open_stream(
    srv: ProviderServer, opts: APIConnectOptions
) -> AsyncIterator[tuple[stt.RecognizeStream, list[STTError], list[stt.SpeechEvent]]]:
    async with aiohttp.ClientSession() as http:
        model = inference.STT(
            model="deepgram/nova-3",
            base_url=srv.inference_url,
            http_session=http,
            **srv.inference_credentials(),
        )
        errors: list[STTError] = []
        model.on("error", errors.append)
        stream = model.stream(conn_options=opts)
        finals: list[stt.SpeechEvent] = []

        async def read() -> None:
            async for ev in stream:
                if ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT:
                    finals.append(ev)

        reader = asyncio.create_task(read())
        try:
            yield stream, errors, finals
        finally:
            await stream.aclose()
            await asyncio.wait({reader}, timeout=1.0)
            if reader.done() and not reader.cancelled():
                reader.exception()
            reader.cancel()


async def speak(stream: stt.RecognizeStream, seconds: float) -> None:
    """Real-time paced tone: the stand-in counts it as audio (no idle close meanwhile)."""
    for frame in tone_frames(seconds):
        stream.push_frame(frame)
        await asyncio.sleep(0.02)


def idle_closes(srv: ProviderServer) -> int:
    return sum(e.startswith("idle_close") for e in srv.events(KIND))


async def until(cond: Any, timeout: float) -> bool:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return True
        await asyncio.sleep(0.02)
    return bool(cond())


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_final_between_idle_closes_resets_the_budget(srv: ProviderServer) -> None:
    """max_retry=1, attempts shorter than conn_options.timeout: only the final transcript
    between two idle closes can reset the counter. The stream survives 3 idle closes."""
    srv.idle_close_after = IDLE
    opts = APIConnectOptions(timeout=5.0, max_retry=1, retry_interval=0.05)
    async with open_stream(srv, opts) as (stream, errors, finals):
        for cycle in range(1, 4):
            await speak(stream, 0.7)
            assert await until(lambda c=cycle: len(finals) >= c, 2.0), (cycle, srv.events(KIND))
            # silence: the provider idle-closes with 2007, the client reconnects
            assert await until(lambda c=cycle: srv.total_connections(KIND) == c + 1, 2.0), srv.events(KIND)
            assert idle_closes(srv) == cycle
        assert not stream._task.done()
        assert await srv.await_open(KIND, 1, 1.0)
    assert len(errors) == 3 and all(e.recoverable for e in errors), errors
    assert all(isinstance(e.error, APIError) and e.error.body == {"code": IDLE_CLOSE_CODE} for e in errors)
    assert await srv.await_open(KIND, 0, 1.0)


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_without_a_final_the_second_idle_close_spends_the_budget(srv: ProviderServer) -> None:
    """Control for the test above: same options, nobody talks, so nothing resets the
    counter and the second short-lived attempt is fatal."""
    srv.idle_close_after = IDLE
    opts = APIConnectOptions(timeout=5.0, max_retry=1, retry_interval=0.05)
    async with open_stream(srv, opts) as (stream, errors, _):
        assert await until(stream._task.done, 3.0)
        assert isinstance(stream._task.exception(), APIConnectionError)
    assert srv.total_connections(KIND) == 2 and idle_closes(srv) == 2
    assert [e.recoverable for e in errors] == [True, False]


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_attempt_longer_than_the_timeout_resets_the_budget(srv: ProviderServer) -> None:
    """The other reset: an attempt that outlived conn_options.timeout had connected, so the
    next failure is not consecutive. No final at all, and the stream survives 3 idle closes."""
    srv.idle_close_after = 0.5
    opts = APIConnectOptions(timeout=0.3, max_retry=1, retry_interval=0.05)
    async with open_stream(srv, opts) as (stream, errors, _):
        assert await until(lambda: idle_closes(srv) >= 3 and srv.total_connections(KIND) >= 4, 4.0)
        assert not stream._task.done()
    assert all(e.recoverable for e in errors), errors


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_long_session_survives_idle_closes_with_one_stream(srv: ProviderServer) -> None:
    """In a session (max_retry=1): the caller talks, falls silent (no frames, the provider
    idle-closes with 2007), talks again... The same RecognizeStream reconnects every time
    (the pipeline never had to recreate it) and no unrecoverable STT error is reported."""
    srv.idle_close_after = IDLE
    opts = APIConnectOptions(timeout=5.0, max_retry=1, retry_interval=0.05)
    models = make_models(srv)
    errors: list[STTError] = []
    models.stt.on("error", errors.append)
    session, audio = make_e2e_session(models, stt_conn_options=opts)
    closes: list[Any] = []
    session.on("close", closes.append)
    try:
        await session.start(E2EAgent(E2EContext()))
        assert await srv.await_open(KIND, 1, 5.0)
        recog = session._activity._audio_recognition  # type: ignore[union-attr]
        first = recog._stt_pipeline._recognize_stream
        assert first is not None
        for cycle in range(1, 4):
            await audio.speak(0.7, then="mute")
            assert await until(lambda c=cycle: idle_closes(srv) == c, 3.0), srv.events(KIND)
            assert await until(lambda c=cycle: srv.total_connections(KIND) == c + 1, 2.0), srv.events(KIND)
        assert recog._stt_pipeline._recognize_stream is first
        assert sum(e.startswith("final") for e in srv.events(KIND)) >= 3
        assert [e.recoverable for e in errors] == [True, True, True], errors
        assert not closes
    finally:
        await session.aclose()
        await models.aclose()


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_nothing_reconnects_after_the_layer_closed_the_session(srv: ProviderServer) -> None:
    """The caller hangs up (no more frames) as a stuck session is closed, while the provider
    idle-closes quiet connections: after the layer's close the server sees no new STT
    connection for a second. (During the close the stream may still answer an idle close
    with one reconnect, as upstream's stream does while the drain bound runs: that
    connection is closed with a goodbye by the close itself.)"""
    srv.idle_close_after = IDLE
    out = await run_e2e_scenario(
        "tool-stuck",
        patched=True,
        server=srv,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        limit=CLOSE_TIMEOUT + MARGIN,
        observe=1.0,
        trigger="text",
        mute_on_close=True,
    )
    assert out.closed and out.stt_open_after == 0, out.summary()
    assert out.stt_reconnects_after_close == 0, out.summary()
    assert out.stt_reconnects_during_close <= 1, out.summary()
    assert out.clean_closes[KIND] == out.stt_connections - sum(
        e.startswith("idle_close") for e in out.events[KIND]
    ), out.summary()


@pytest.mark.vanilla
@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_vanilla_stuck_session_keeps_reconnecting(srv: ProviderServer) -> None:
    """Bite for the test above: the hung vanilla session's stream answers the idle close
    with a reconnect, and goes on (until its retry budget runs out: then the budget, not
    the close, ends the stream)."""
    srv.idle_close_after = IDLE
    out = await run_e2e_scenario(
        "tool-stuck", patched=False, server=srv, limit=1.0, observe=0.5, trigger="text", mute_on_close=True
    )
    assert not out.closed, out.summary()
    assert out.stt_reconnects_during_close + out.stt_reconnects_after_close >= 1, out.summary()
