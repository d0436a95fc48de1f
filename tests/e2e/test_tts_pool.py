"""What stays open at the TTS provider after `session.aclose()`: the pooled sockets.

`inference.TTS` keeps its websockets in a `utils.ConnectionPool` owned by the TTS
instance, not by the session: the socket prewarmed at activity start (and reused by every
synthesis) survives the session close, with or without the layer, until `tts.aclose()`
(a clean close frame) or until the aiohttp session under it closes (dropped, no goodbye;
in a job that is the job's http context at shutdown). A socket whose synthesis was
cancelled is only queued for closing (`ConnectionPool.remove`) and closed at the next
`get()` or `aclose()` of the pool.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT, MARGIN

import livekit_safeclose as lsc
from livekit_safeclose.testing.e2e import (
    E2EAgent,
    E2EContext,
    make_e2e_session,
    make_models,
    run_e2e_scenario,
)
from livekit_safeclose.testing.standins import ProviderServer

TTS = "inference_tts"


async def _healthy_session_closed(srv: ProviderServer, *, patched: bool, close_models: bool = False) -> Any:
    if patched:
        lsc.install(drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT, close_models=close_models)
    models = make_models(srv)
    session, _ = make_e2e_session(models)
    await session.start(E2EAgent(E2EContext()))
    assert await srv.await_open("inference_stt", 1, 5.0)
    assert await srv.await_open(TTS, 1, 5.0)  # prewarmed at activity start
    await session.say("hello there, how are you").wait_for_playout()
    await asyncio.wait_for(session.aclose(), CLOSE_TIMEOUT + MARGIN)
    return models


@pytest.mark.timeout(20)
@pytest.mark.asyncio
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_pooled_tts_socket_outlives_the_session_until_tts_aclose(
    srv: ProviderServer, patched: bool
) -> None:
    models = await _healthy_session_closed(srv, patched=patched)
    try:
        assert await srv.await_open("inference_stt", 0, 1.0)
        await asyncio.sleep(1.0)
        # one socket, used by the synthesis, still open a second after the close
        assert srv.open_connections(TTS) == 1 and srv.total_connections(TTS) == 1
        assert any(e.startswith("synthesize") for e in srv.events(TTS))
        await models.tts.aclose()
        assert await srv.await_open(TTS, 0, 1.0)
        assert srv.clean_closes(TTS) == 1  # a client close frame: a goodbye
    finally:
        await models.aclose()


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_dropping_the_http_session_closes_pooled_sockets_without_goodbye(srv: ProviderServer) -> None:
    models = await _healthy_session_closed(srv, patched=True)
    await models.http.close()
    assert await srv.await_open(TTS, 0, 1.0)
    assert srv.clean_closes(TTS) == 0
    await models.aclose()


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_stalled_tts_socket_stays_open_after_the_layer_closed_the_session(srv: ProviderServer) -> None:
    """The goodbye's synthesis was cancelled by the layer: its socket left the pool but is
    only closed at the pool's next get() or aclose(); the STT connection is gone."""
    out = await run_e2e_scenario(
        "tts-stall-goodbye",
        patched=True,
        server=srv,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        limit=CLOSE_TIMEOUT + MARGIN,
        observe=1.0,
    )
    assert out.closed and out.stt_open_after == 0, out.summary()
    assert out.tts_open_after == 1, out.summary()
    # run_e2e_scenario closes the models before returning: the pool's aclose() ends it
    assert await srv.await_open(TTS, 0, 1.0)


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_close_models_option_closes_the_pool_with_a_goodbye(srv: ProviderServer) -> None:
    """install(close_models=True): the session's own TTS instance is closed with the
    session, so its pooled socket ends with a close frame instead of lingering."""
    models = await _healthy_session_closed(srv, patched=True, close_models=True)
    try:
        assert await srv.await_open(TTS, 0, 1.0)
        assert srv.clean_closes(TTS) == 1
        assert await srv.await_open("inference_stt", 0, 1.0)
    finally:
        await models.aclose()


@pytest.mark.timeout(20)
@pytest.mark.asyncio
async def test_close_models_spares_a_model_another_session_uses(srv: ProviderServer) -> None:
    lsc.install(drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT, close_models=True)
    models = make_models(srv)
    first, _ = make_e2e_session(models)
    second, _ = make_e2e_session(models)
    try:
        await first.start(E2EAgent(E2EContext()))
        await second.start(E2EAgent(E2EContext()))
        assert await srv.await_open("inference_stt", 2, 5.0)
        await asyncio.wait_for(first.aclose(), CLOSE_TIMEOUT + MARGIN)
        assert await srv.await_open("inference_stt", 1, 2.0)
        await asyncio.sleep(0.3)
        assert srv.open_connections(TTS) == 1  # the shared TTS pool was not closed
        await second.say("still here").wait_for_playout()
        await asyncio.wait_for(second.aclose(), CLOSE_TIMEOUT + MARGIN)
        assert await srv.await_open(TTS, 0, 1.0)  # the last user closes it
    finally:
        await models.aclose()
