"""The stand-in provider servers, driven by the REAL plugins over real 127.0.0.1 sockets.

Besides checking the stand-ins, these tests pin the upstream client behaviours the
core layer relies on (retry counts, what a close waits for, drain durations), so a
livekit-agents upgrade that changes them fails here first.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from livekit.agents import (
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    APITimeoutError,
    inference,
    llm,
    stt,
)
from livekit.agents.stt import STTError
from livekit.plugins import deepgram, openai

from livekit_safeclose.testing.standins import (
    IDLE_CLOSE_CODE,
    Kind,
    LLMReply,
    ProviderServer,
    tone_frames,
)

pytestmark = pytest.mark.timeout(20)

FAST = APIConnectOptions(timeout=0.5, max_retry=0, retry_interval=0.1)


@asynccontextmanager
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_stt(kind: Kind, srv: ProviderServer, http: aiohttp.ClientSession) -> stt.STT[Any]:
    if kind == "inference_stt":
        return inference.STT(
            model="deepgram/nova-3",
            base_url=srv.inference_url,
            http_session=http,
            **srv.inference_credentials(),
        )
    return deepgram.STT(base_url=srv.deepgram_url, api_key=srv.provider_api_key, http_session=http)


def make_tts(srv: ProviderServer, http: aiohttp.ClientSession) -> inference.TTS:
    return inference.TTS(
        model="cartesia/sonic-3",
        base_url=srv.inference_url,
        http_session=http,
        **srv.inference_credentials(),
    )


async def next_final(stream: stt.RecognizeStream, timeout: float = 3.0) -> stt.SpeechEvent:
    async def read() -> stt.SpeechEvent:
        async for ev in stream:
            if ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT:
                return ev
        raise AssertionError("stream ended without a final transcript")

    return await asyncio.wait_for(read(), timeout)


async def run_to_end(stream: stt.RecognizeStream, timeout: float) -> BaseException | None:
    """Consume a stream; returns the exception it ended with (None for a normal end)."""

    async def read() -> None:
        async for _ in stream:
            pass

    try:
        await asyncio.wait_for(read(), timeout)
    except (APIError, asyncio.TimeoutError) as e:
        return e
    return None


def push_tone(stream: stt.RecognizeStream, seconds: float) -> None:
    for frame in tone_frames(seconds):
        stream.push_frame(frame)


# --------------------------------------------------------------------------- STT happy paths


@pytest.mark.asyncio
async def test_inference_stt_transcribes_and_closes_cleanly(srv: ProviderServer) -> None:
    srv.transcript_text = "hello from the stand-in"
    async with http_session() as http:
        stream = make_stt("inference_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 1.0)
        final = await next_final(stream)
        assert final.alternatives[0].text == "hello from the stand-in"
        assert final.alternatives[0].words is not None
        assert srv.open_connections("inference_stt") == 1

        await stream.aclose()
        assert await srv.await_open("inference_stt", 0, 2.0)
    assert srv.clean_closes("inference_stt") == 1
    assert srv.total_connections("inference_stt") == 1
    events = [e.split("#")[0] for e in srv.events("inference_stt")]
    assert events[:4] == ["request", "open", "session.create", "start_of_speech"]
    assert "session.close" in events


@pytest.mark.asyncio
async def test_inference_stt_finalize_flushes_short_speech(srv: ProviderServer) -> None:
    """Speech shorter than speech_min_seconds is only transcribed on session.finalize
    (sent by end_input); finalize_delay makes that final arrive late."""
    srv.finalize_delay = 0.3
    async with http_session() as http:
        stream = make_stt("inference_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 0.3)
        await asyncio.sleep(0.2)
        assert not any(e.startswith("final") for e in srv.events("inference_stt"))
        t0 = time.monotonic()
        stream.end_input()
        final = await next_final(stream)
        assert time.monotonic() - t0 >= 0.28
        assert final.alternatives[0].text == "hello there"
        await stream.aclose()
        assert await srv.await_open("inference_stt", 0, 2.0)
    events = [e.split("#")[0] for e in srv.events("inference_stt")]
    assert events.index("session.finalize") < events.index("final")
    assert srv.clean_closes("inference_stt") == 1


@pytest.mark.asyncio
async def test_inference_stt_drain_lingers_three_seconds_after_final(srv: ProviderServer) -> None:
    """Upstream fact: after end_input the inference client keeps the socket until 3 s
    (FINAL_TRANSCRIPT_INACTIVITY_TIMEOUT) pass without a transcript, even though the
    server has answered session.finalize; only then it sends session.close."""
    async with http_session() as http:
        stream = make_stt("inference_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 1.0)
        await next_final(stream)
        t0 = time.monotonic()
        stream.end_input()
        assert await run_to_end(stream, 6.0) is None
        elapsed = time.monotonic() - t0
        await stream.aclose()
    assert 2.8 <= elapsed <= 4.0, elapsed
    assert await srv.await_open("inference_stt", 0, 2.0)
    assert srv.clean_closes("inference_stt") == 1


@pytest.mark.asyncio
async def test_deepgram_stt_transcribes_and_closes_cleanly(srv: ProviderServer) -> None:
    async with http_session() as http:
        stream = make_stt("deepgram_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 1.0)
        final = await next_final(stream)
        assert final.alternatives[0].text == "hello there"
        assert srv.open_connections("deepgram_stt") == 1
        # aclose closes the input first, so send_task gets CloseStream out before the cancel
        await stream.aclose()
        assert await srv.await_open("deepgram_stt", 0, 2.0)
    assert srv.clean_closes("deepgram_stt") == 1
    assert any(e.startswith("CloseStream") for e in srv.events("deepgram_stt"))


@pytest.mark.asyncio
async def test_deepgram_stt_drain_waits_for_keepalive_tick(srv: ProviderServer) -> None:
    """Upstream fact: end_input sends Finalize + CloseStream and the server answers and
    closes at once, but the plugin's keepalive task only notices the closed socket on its
    next 5 s tick, so the stream ends ~5 s after connect rather than when the server closed."""
    async with http_session() as http:
        stream = make_stt("deepgram_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 0.3)  # below speech_min_seconds: only the finalize transcribes it
        t0 = time.monotonic()
        stream.end_input()
        final = await next_final(stream)
        assert final.alternatives[0].text == "hello there"
        assert await srv.await_open("deepgram_stt", 0, 2.0)
        server_closed_after = time.monotonic() - t0
        assert await run_to_end(stream, 7.0) is None
        elapsed = time.monotonic() - t0
        await stream.aclose()
    assert server_closed_after < 1.0
    assert 4.5 <= elapsed <= 6.0, elapsed
    assert srv.clean_closes("deepgram_stt") == 1
    events = [e.split("#")[0] for e in srv.events("deepgram_stt")]
    assert events.index("Finalize") < events.index("CloseStream")


# --------------------------------------------------------------------------- TTS and LLM


@pytest.mark.asyncio
async def test_inference_tts_synthesizes_and_pool_keeps_socket(srv: ProviderServer) -> None:
    srv.tts_ms_per_word = 60.0
    async with http_session() as http:
        tts = make_tts(srv, http)
        duration = 0.0
        frames = 0
        async for ev in tts.synthesize("one two three four five six seven eight nine ten"):
            frames += 1
            duration += ev.frame.duration
            assert ev.frame.sample_rate == 24000
        assert frames > 0
        assert 0.55 <= duration <= 0.7, duration  # 10 words * 60 ms
        # pooled: the socket outlives the synthesis and is reused by the next one
        assert srv.open_connections("inference_tts") == 1
        async for _ in tts.synthesize("again"):
            pass
        assert srv.total_connections("inference_tts") == 1
        await tts.aclose()
        assert await srv.await_open("inference_tts", 0, 2.0)
    assert srv.clean_closes("inference_tts") == 1


@pytest.mark.asyncio
async def test_openai_llm_tool_call_round_trip(srv: ProviderServer) -> None:
    srv.script_llm(
        LLMReply(text="Let me check.", tool_calls=[("get_weather", {"city": "Paris", "days": 2})]),
        LLMReply(text="It is sunny."),
    )

    @llm.function_tool
    async def get_weather(city: str, days: int) -> str:
        """Weather for a city."""
        return "sunny"

    model = openai.LLM(model="gpt-4o-mini", base_url=srv.openai_url, api_key=srv.provider_api_key)
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="weather in Paris?")
    text = ""
    calls: list[llm.FunctionToolCall] = []
    async with model.chat(chat_ctx=ctx, tools=[get_weather], conn_options=FAST) as stream:
        async for chunk in stream:
            if chunk.delta is not None:
                text += chunk.delta.content or ""
                calls.extend(chunk.delta.tool_calls)
    assert text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2})
    ]

    call = calls[0]
    ctx.insert(llm.FunctionCall(call_id=call.call_id, name=call.name, arguments=call.arguments))
    ctx.insert(llm.FunctionCallOutput(call_id=call.call_id, name=call.name, output="sunny", is_error=False))
    async with model.chat(chat_ctx=ctx, tools=[get_weather], conn_options=FAST) as stream:
        answer = "".join([c.delta.content or "" async for c in stream if c.delta is not None])
    assert answer == "It is sunny."

    second = srv.llm_requests[1]
    assert second.client == "openai"
    assert second.tools == ["get_weather"]
    assert second.tool_outputs() == [{"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    # script exhausted: plain "ok"
    async with model.chat(chat_ctx=ctx, conn_options=FAST) as stream:
        assert "".join([c.delta.content or "" async for c in stream if c.delta]) == "ok"
    await model.aclose()
    assert srv.clean_closes("llm") == 3
    assert srv.open_connections("llm") == 0


@pytest.mark.asyncio
async def test_inference_llm_uses_same_endpoint_with_jwt(srv: ProviderServer) -> None:
    srv.script_llm(LLMReply(tool_calls=[("lookup", {"q": "x"}), ("lookup", {"q": "y"})]))
    model = inference.LLM(
        model="openai/gpt-4o-mini", base_url=srv.inference_url, **srv.inference_credentials()
    )
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="hi")
    calls: list[llm.FunctionToolCall] = []
    async with model.chat(chat_ctx=ctx, conn_options=FAST) as stream:
        async for chunk in stream:
            if chunk.delta is not None:
                calls.extend(chunk.delta.tool_calls)
    await model.aclose()
    assert [json.loads(c.arguments) for c in calls] == [{"q": "x"}, {"q": "y"}]
    assert len({c.call_id for c in calls}) == 2
    assert srv.llm_requests[0].client == "inference"


# --------------------------------------------------------------------------- switches


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["inference_stt", "deepgram_stt"])
@pytest.mark.parametrize("mode", ["http429", "error_frame"])
async def test_stt_quota_rejects_and_client_retries(srv: ProviderServer, kind: Kind, mode: str) -> None:
    """Both modes surface as retryable errors: the client retries max_retry times
    (0.1 s, then retry_interval apart) and then fails with APIConnectionError."""
    srv.stt_quota = 1
    srv.quota_mode = "http429" if mode == "http429" else "error_frame"
    async with http_session() as http:
        model = make_stt(kind, srv, http)
        holder = model.stream(conn_options=FAST)
        assert await srv.await_open(kind, 1, 2.0)

        errors: list[STTError] = []
        model.on("error", errors.append)
        refused = model.stream(conn_options=APIConnectOptions(timeout=1, max_retry=1, retry_interval=0.1))
        err = await run_to_end(refused, 3.0)
        assert isinstance(err, APIConnectionError), err
        assert "after 1 attempts" in str(err)
        assert [e.recoverable for e in errors] == [True, False]
        first = errors[0].error
        if mode == "http429" or kind == "deepgram_stt":
            assert isinstance(first, APIStatusError)
            assert first.status_code == (429 if mode == "http429" else 1008)
        else:
            assert isinstance(first, APIError) and first.body == {"code": 429}
        await refused.aclose()
        await holder.aclose()
    assert srv.rejected(kind) == 2
    assert srv.total_connections(kind) == 3


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["inference_stt", "deepgram_stt"])
async def test_idle_close_makes_client_reconnect(srv: ProviderServer, kind: Kind) -> None:
    srv.idle_close_after = 0.3
    async with http_session() as http:
        model = make_stt(kind, srv, http)
        errors: list[STTError] = []
        model.on("error", errors.append)
        stream = model.stream(conn_options=APIConnectOptions(timeout=1, max_retry=1, retry_interval=0.1))
        err = await run_to_end(stream, 3.0)
        await stream.aclose()
    assert isinstance(err, APIConnectionError), err
    # the reconnect is visible server-side: one fresh connection per retry
    assert srv.total_connections(kind) == 2
    assert sum(e.startswith("idle_close") for e in srv.events(kind)) == 2
    assert [e.recoverable for e in errors] == [True, False]
    first = errors[0].error
    if kind == "inference_stt":
        assert isinstance(first, APIError) and first.body == {"code": IDLE_CLOSE_CODE}
    else:
        assert isinstance(first, APIStatusError) and first.status_code == 1011


@pytest.mark.asyncio
async def test_idle_close_spares_streams_with_audio(srv: ProviderServer) -> None:
    srv.idle_close_after = 0.3
    async with http_session() as http:
        stream = make_stt("inference_stt", srv, http).stream(conn_options=FAST)
        for frame in tone_frames(0.9):
            stream.push_frame(frame)
            await asyncio.sleep(0.02)
        await stream.aclose()
        assert await srv.await_open("inference_stt", 0, 2.0)
    assert srv.total_connections("inference_stt") == 1
    assert not any(e.startswith("idle_close") for e in srv.events("inference_stt"))
    assert srv.clean_closes("inference_stt") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["inference_stt", "deepgram_stt", "inference_tts", "llm"])
async def test_stall_no_handshake_times_out_per_conn_options(srv: ProviderServer, kind: Kind) -> None:
    srv.stall = "no_handshake"
    t0 = time.monotonic()
    async with http_session() as http:
        if kind == "inference_tts":
            tts = make_tts(srv, http)
            with pytest.raises(APITimeoutError):
                async for _ in tts.synthesize("hello", conn_options=FAST):
                    pass
            await tts.aclose()
        elif kind == "llm":
            model = openai.LLM(model="gpt-4o-mini", base_url=srv.openai_url, api_key=srv.provider_api_key)
            ctx = llm.ChatContext.empty()
            ctx.add_message(role="user", content="hi")
            with pytest.raises(APITimeoutError):
                async for _ in model.chat(chat_ctx=ctx, conn_options=FAST):
                    pass
            await model.aclose()
        else:
            stream = make_stt(kind, srv, http).stream(conn_options=FAST)
            err = await run_to_end(stream, 3.0)
            await stream.aclose()
            # inference maps the connect timeout to APITimeoutError, deepgram to a plain
            # APIConnectionError("failed to connect to deepgram")
            assert isinstance(err, APITimeoutError if kind == "inference_stt" else APIConnectionError)
    elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed <= 1.5, elapsed
    # the held request is released once the client gives up
    assert await srv.await_open(kind, 0, 2.0)
    assert srv.total_connections(kind) == 1


@pytest.mark.asyncio
async def test_stall_never_answer_tts_times_out_and_socket_lingers(srv: ProviderServer) -> None:
    """Upstream fact: the timed-out TTS socket is only marked for closing by the pool and
    actually closed on the next pool use or TTS.aclose()."""
    srv.stall = "never_answer"
    async with http_session() as http:
        tts = make_tts(srv, http)
        t0 = time.monotonic()
        with pytest.raises(APITimeoutError):
            async for _ in tts.synthesize("hello", conn_options=FAST):
                pass
        assert 0.45 <= time.monotonic() - t0 <= 1.5
        await asyncio.sleep(0.2)
        assert srv.open_connections("inference_tts") == 1
        await tts.aclose()
        assert await srv.await_open("inference_tts", 0, 2.0)


@pytest.mark.asyncio
async def test_stall_never_answer_llm_times_out(srv: ProviderServer) -> None:
    srv.stall = "never_answer"
    model = openai.LLM(model="gpt-4o-mini", base_url=srv.openai_url, api_key=srv.provider_api_key)
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="hi")
    t0 = time.monotonic()
    with pytest.raises(APITimeoutError):
        async for _ in model.chat(chat_ctx=ctx, conn_options=FAST):
            pass
    assert 0.45 <= time.monotonic() - t0 <= 1.5
    await model.aclose()
    assert await srv.await_open("llm", 0, 2.0)
    assert len(srv.llm_requests) == 1  # the request was read, just never answered


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["inference_stt", "deepgram_stt"])
async def test_stall_never_answer_stt_gives_no_events_but_closes(srv: ProviderServer, kind: Kind) -> None:
    """A silent STT server never trips conn_options.timeout (there is no receive timeout
    while streaming); aclose still ends it promptly and says goodbye."""
    srv.stall = "never_answer"
    async with http_session() as http:
        stream = make_stt(kind, srv, http).stream(conn_options=FAST)
        push_tone(stream, 1.0)
        with pytest.raises(asyncio.TimeoutError):
            await next_final(stream, timeout=1.0)
        t0 = time.monotonic()
        await stream.aclose()
        assert time.monotonic() - t0 < 0.5
        assert await srv.await_open(kind, 0, 2.0)
    assert srv.clean_closes(kind) == 1


@pytest.mark.asyncio
async def test_slow_close_delays_tts_close_but_not_stt_aclose(srv: ProviderServer) -> None:
    """Upstream fact: aclose() of an STT stream cancels a pending ws.receive(), which makes
    aiohttp drop the TCP connection right after sending its close frame, so the server's
    slow close ack is never awaited. The TTS pool closes an idle socket with a plain
    ws.close(), which waits for the server's close frame."""
    srv.slow_close = 0.8
    async with http_session() as http:
        stream = make_stt("inference_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 0.6)
        await next_final(stream)
        t0 = time.monotonic()
        await stream.aclose()
        assert time.monotonic() - t0 < 0.3
        assert await srv.await_open("inference_stt", 0, 2.0)
        assert srv.clean_closes("inference_stt") == 1

        tts = make_tts(srv, http)
        async for _ in tts.synthesize("hello there"):
            pass
        t0 = time.monotonic()
        await tts.aclose()
        assert 0.75 <= time.monotonic() - t0 <= 1.5
        assert await srv.await_open("inference_tts", 0, 2.0)
    assert srv.clean_closes("inference_tts") == 1
    assert any(e.startswith("slow_close") for e in srv.events("inference_tts"))


# --------------------------------------------------------------------------- server plumbing


@pytest.mark.asyncio
async def test_stop_is_bounded_with_stuck_clients() -> None:
    srv = ProviderServer().start()
    srv.stall = "never_answer"
    async with http_session() as http:
        stream = make_stt("inference_stt", srv, http).stream(conn_options=FAST)
        push_tone(stream, 0.2)
        model = openai.LLM(model="gpt-4o-mini", base_url=srv.openai_url, api_key=srv.provider_api_key)
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="user", content="hi")

        async def chat() -> BaseException | None:
            try:
                async for _ in model.chat(
                    chat_ctx=ctx, conn_options=APIConnectOptions(timeout=10, max_retry=0)
                ):
                    pass
            except APIError as e:
                return e
            return None

        llm_task = asyncio.create_task(chat())
        assert await srv.await_open("inference_stt", 1, 2.0)
        assert await srv.await_open("llm", 1, 2.0)
        srv.stall = "no_handshake"
        tts = make_tts(srv, http)
        tts_task = asyncio.create_task(
            tts.synthesize("hello", conn_options=APIConnectOptions(timeout=10, max_retry=0)).collect()
        )
        assert await srv.await_open("inference_tts", 1, 2.0)

        # stop() from the client's own loop: the loop is blocked for the whole call,
        # i.e. every client is stuck and none can answer a close handshake
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 2.0
        assert all(srv.open_connections(k) == 0 for k in ("inference_stt", "inference_tts", "llm"))

        assert isinstance(await asyncio.wait_for(llm_task, 5.0), APIConnectionError)
        with pytest.raises(APIError):
            await asyncio.wait_for(tts_task, 5.0)
        await stream.aclose()
        await tts.aclose()
        await model.aclose()
    srv.stop()  # idempotent


@pytest.mark.asyncio
async def test_bad_credentials_are_refused(srv: ProviderServer) -> None:
    async with http_session() as http:
        model = inference.STT(
            model="deepgram/nova-3",
            base_url=srv.inference_url,
            http_session=http,
            api_key=srv.api_key,
            api_secret="a-different-secret-0123456789abcdef0123",
        )
        stream = model.stream(conn_options=FAST)
        err = await run_to_end(stream, 3.0)
        await stream.aclose()
    assert isinstance(err, APIStatusError) and err.status_code == 401 and not err.retryable
    assert any(e.startswith("unauthorized") for e in srv.events("inference_stt"))
    assert srv.open_connections("inference_stt") == 0


def test_wait_open_and_counters_are_usable_from_plain_threads() -> None:
    with ProviderServer() as server:
        assert server.wait_open("llm", 0, 0.1)
        t0 = time.monotonic()
        assert not server.wait_open("llm", 1, 0.2)
        assert 0.18 <= time.monotonic() - t0 < 1.0
        assert server.inference_url.startswith("http://127.0.0.1:")
        assert server.deepgram_url == f"{server.base_url}/v1/listen"
        assert server.openai_url == f"{server.base_url}/v1"
    assert not server.running
    with pytest.raises(RuntimeError):
        _ = ProviderServer().port
