"""The OpenAI Realtime stand-in, driven by the REAL ``openai.realtime.RealtimeModel`` client.

Besides checking the stand-in speaks the protocol the client needs (a reply, a tool call, a
chat-context update, server-side turns), these pin the client behaviours the realtime
scenarios rest on: a held upgrade keeps ``aclose()`` waiting for the connect timeout, an
unanswered close frame does not, a fatal in-band error ends the session without retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from livekit.agents import APIConnectOptions, llm
from livekit.plugins import openai

from livekit_safeclose.testing.standins import LLMReply, ProviderServer, silence_frames, tone_frames

pytestmark = pytest.mark.timeout(20)

KIND = "openai_realtime"
FAST = APIConnectOptions(timeout=0.5, max_retry=0, retry_interval=0.1)


@asynccontextmanager
async def realtime(
    srv: ProviderServer, conn_options: APIConnectOptions = FAST, api_key: str | None = None
) -> AsyncIterator[openai.realtime.RealtimeSession]:
    async with aiohttp.ClientSession() as http:
        model = openai.realtime.RealtimeModel(
            base_url=srv.openai_url,
            api_key=api_key or srv.provider_api_key,
            http_session=http,
            conn_options=conn_options,
        )
        session = model.session()
        try:
            yield session
        finally:
            closer = asyncio.ensure_future(session.aclose())
            await asyncio.wait({closer}, timeout=2.0)
            closer.cancel()


async def drain(gen: llm.GenerationCreatedEvent) -> tuple[list[llm.FunctionCall], str, int]:
    """Read a generation to its end: (function calls, text, audio frames)."""
    calls: list[llm.FunctionCall] = []
    texts: list[str] = []
    frames = 0

    async def read_calls() -> None:
        async for call in gen.function_stream:
            calls.append(call)

    async def read_messages() -> None:
        nonlocal frames
        async for msg in gen.message_stream:
            texts.extend([t async for t in msg.text_stream])
            frames += len([f async for f in msg.audio_stream])

    await asyncio.wait_for(asyncio.gather(read_calls(), read_messages()), 5.0)
    return calls, "".join(texts), frames


@pytest.mark.asyncio
async def test_tool_call_round_trip_and_clean_close(srv: ProviderServer) -> None:
    srv.script_realtime(LLMReply(tool_calls=[("lookup", {"q": "x"})]), LLMReply(text="Here you go."))
    async with realtime(srv) as rt:
        gen = await asyncio.wait_for(rt.generate_reply(), 5.0)
        assert gen.user_initiated
        calls, _, _ = await drain(gen)
        assert [(c.name, c.arguments) for c in calls] == [("lookup", '{"q": "x"}')]
        # the tool result goes back as a chat-context update the server confirms
        ctx = rt.chat_ctx.copy()
        assert [i.type for i in ctx.items] == ["function_call"]
        ctx.items.append(
            llm.FunctionCallOutput(call_id=calls[0].call_id, name="lookup", output="found", is_error=False)
        )
        t0 = time.monotonic()
        await rt.update_chat_ctx(ctx)
        assert time.monotonic() - t0 < 1.0
        _, text, frames = await drain(await asyncio.wait_for(rt.generate_reply(), 5.0))
        assert text == "Here you go." and frames >= 1
        t0 = time.monotonic()
        await asyncio.wait_for(rt.aclose(), 2.0)
        assert time.monotonic() - t0 < 0.5
    assert await srv.await_open(KIND, 0, 1.0)
    assert srv.clean_closes(KIND) == 1  # the client's close frame is its goodbye
    assert "function_call#1:lookup" in srv.events(KIND)


@pytest.mark.asyncio
async def test_held_tool_result_makes_update_chat_ctx_wait(srv: ProviderServer) -> None:
    """``realtime_item_delay`` holds the confirmation of a tool result: the client's
    update waits for it (and, once the session closed, for its 5 s timeout)."""
    srv.script_realtime(LLMReply(tool_calls=[("lookup", {})]))
    srv.realtime_item_delay = 0.6
    async with realtime(srv) as rt:
        calls, _, _ = await drain(await asyncio.wait_for(rt.generate_reply(), 5.0))
        ctx = rt.chat_ctx.copy()
        ctx.items.append(
            llm.FunctionCallOutput(call_id=calls[0].call_id, name="lookup", output="x", is_error=False)
        )
        t0 = time.monotonic()
        await rt.update_chat_ctx(ctx)
        assert 0.5 <= time.monotonic() - t0 < 2.0
    assert any(e.startswith("item_delay#") for e in srv.events(KIND))


@pytest.mark.asyncio
async def test_server_turn_detection_answers_a_spoken_turn(srv: ProviderServer) -> None:
    srv.script_realtime(LLMReply(text="hi"))
    async with realtime(srv) as rt:
        created: asyncio.Queue[llm.GenerationCreatedEvent] = asyncio.Queue()
        rt.on("generation_created", created.put_nowait)
        for frame in tone_frames(0.8) + silence_frames(0.4):
            rt.push_audio(frame)
        gen = await asyncio.wait_for(created.get(), 5.0)
        assert not gen.user_initiated  # the server created it
        _, text, _ = await drain(gen)
        assert text == "hi"
    assert "speech_started#1" in srv.events(KIND)


@pytest.mark.asyncio
async def test_no_handshake_keeps_aclose_waiting_for_the_connect_timeout(srv: ProviderServer) -> None:
    srv.stall, srv.stall_kinds = "no_handshake", frozenset({KIND})
    async with realtime(srv, APIConnectOptions(timeout=1.0, max_retry=0, retry_interval=0.1)) as rt:
        assert await srv.await_open(KIND, 1, 2.0)  # the upgrade request is held
        t0 = time.monotonic()
        closer = asyncio.ensure_future(rt.aclose())
        done, _ = await asyncio.wait({closer}, timeout=0.4)
        assert not done, "aclose() returned while the upgrade was held"
        await asyncio.wait({closer}, timeout=2.0)
        assert closer.done() and time.monotonic() - t0 >= 0.5
    assert await srv.await_open(KIND, 0, 1.0)


@pytest.mark.asyncio
async def test_unanswered_close_frame_does_not_hold_aclose(srv: ProviderServer) -> None:
    srv.stall, srv.stall_kinds = "no_close_ack", frozenset({KIND})
    async with realtime(srv) as rt:
        assert await srv.await_open(KIND, 1, 2.0)
        t0 = time.monotonic()
        await asyncio.wait_for(rt.aclose(), 2.0)
        assert time.monotonic() - t0 < 0.5
    assert await srv.await_open(KIND, 0, 1.0)
    assert "stall:no_close_ack#1" in srv.events(KIND)


@pytest.mark.asyncio
async def test_fatal_refusal_ends_the_session_without_retries(srv: ProviderServer) -> None:
    srv.realtime_refusal = "insufficient_quota"
    errors: list[Any] = []
    async with realtime(srv, APIConnectOptions(timeout=1.0, max_retry=3, retry_interval=0.1)) as rt:
        rt.on("error", errors.append)
        await asyncio.sleep(0.5)
        assert rt._main_atask.done()
    assert srv.total_connections(KIND) == 1
    assert errors and not errors[-1].recoverable


@pytest.mark.asyncio
async def test_bad_credentials_are_refused(srv: ProviderServer) -> None:
    errors: list[Any] = []
    async with realtime(srv, api_key="wrong") as rt:
        rt.on("error", errors.append)
        await asyncio.sleep(0.5)
    assert "unauthorized#1" in srv.events(KIND)
    assert errors
