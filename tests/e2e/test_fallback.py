"""``FallbackAdapter`` recovery ends with the session, over real sockets.

The real Deepgram and Inference STT plugins (and two real Inference TTS plugins) in a
``FallbackAdapter``; the primary is refused once (HTTP 503), then back (or hung). What
counts is the failed provider's server: the connections it still holds a second after the
close. Vanilla keeps the recovery (the proof); with the layer the provider sees nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT, MARGIN
from livekit.agents import tts

import livekit_safeclose as lsc
from livekit_safeclose.fallback import recovery_tasks
from livekit_safeclose.testing._runs import close_ended
from livekit_safeclose.testing.e2e import (
    E2EAgent,
    E2EContext,
    FallbackOutcome,
    STTKind,
    make_e2e_session,
    make_models,
    make_stt_fallback,
    run_fallback_scenario,
)
from livekit_safeclose.testing.e2e.fallback import FALLBACK_CONN_OPTIONS
from livekit_safeclose.testing.e2e.models import make_tts
from livekit_safeclose.testing.standins import ProviderServer

PRIMARIES: list[STTKind] = ["deepgram_stt", "inference_stt"]
TTS_CASES = ["tts-fallback-probe-on-close", "tts-fallback-probe-in-flight"]


async def _run(
    name: str, srv: ProviderServer, *, patched: bool, graceful: bool, primary: STTKind = "deepgram_stt"
) -> FallbackOutcome:
    return await run_fallback_scenario(
        name,
        patched=patched,
        server=srv,
        primary=primary,
        graceful=graceful,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        limit=CLOSE_TIMEOUT + MARGIN,
        observe=1.0,
    )


def _listed(out: FallbackOutcome, step: str) -> bool:
    report = out.report
    return report is not None and any(s.name == step and s.outcome == "done" for s in report.steps)


@pytest.mark.timeout(40)
@pytest.mark.asyncio
@pytest.mark.parametrize("graceful", [False, True], ids=["aclose", "drain"])
@pytest.mark.parametrize("primary", PRIMARIES)
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_stt_recovery_stream_ends_with_the_session(
    srv: ProviderServer, patched: bool, primary: STTKind, graceful: bool
) -> None:
    out = await _run("stt-fallback-recovery", srv, patched=patched, graceful=graceful, primary=primary)
    assert out.engaged and not out.error and out.primary_open_before == 1, out.summary()
    assert out.closed and out.close_events == 1, out.summary()
    if not patched:
        # the recovery stream outlives the session: only FallbackAdapter.aclose() ends it
        assert out.primary_open_after == 1 and out.recovery_tasks_left == 1, out.summary()
        return
    assert out.primary_open_after == 0 and out.recovery_tasks_left == 0, out.summary()
    assert out.requests_after_close == 0, out.summary()
    assert _listed(out, "fallback.recovery.cancel"), out.summary()
    assert out.report is not None and out.report.streams_closed_by_force, out.summary()
    assert any("_recover_stt_task" in name for name in out.report.cancelled), out.summary()


@pytest.mark.timeout(40)
@pytest.mark.asyncio
@pytest.mark.parametrize("graceful", [False, True], ids=["aclose", "drain"])
@pytest.mark.parametrize("name", TTS_CASES)
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_tts_probe_does_not_outlive_the_session(
    srv: ProviderServer, patched: bool, name: str, graceful: bool
) -> None:
    out = await _run(name, srv, patched=patched, graceful=graceful)
    assert out.engaged and not out.error, out.summary()
    assert out.closed and out.close_events == 1, out.summary()
    on_close = name == "tts-fallback-probe-on-close"
    if not patched:
        # on close: the close's cancel (or the drained reply's end) starts a probe, whose
        # socket then stays in the primary's pool; in flight: it keeps connecting
        assert out.primary_open_after == 1, out.summary()
        assert out.requests_after_close == (1 if on_close else 0), out.summary()
        return
    assert out.primary_open_after == 0 and out.requests_after_close == 0, out.summary()
    assert out.recovery_tasks_left == 0, out.summary()
    assert _listed(out, "fallback.recovery_not_started" if on_close else "fallback.recovery.cancel"), (
        out.summary()
    )


async def _bounded_close(session: Any) -> None:
    await asyncio.wait_for(session.aclose(), CLOSE_TIMEOUT + MARGIN)
    await asyncio.wait_for(close_ended(session), MARGIN)


@pytest.mark.timeout(40)
@pytest.mark.asyncio
@pytest.mark.parametrize("close_models", [False, True], ids=["default", "close_models"])
async def test_shared_stt_adapter_keeps_working_for_the_other_session(
    srv: ProviderServer, close_models: bool
) -> None:
    """Two sessions on one adapter: the first's stream started the recovery; closing it
    stops that recovery only. The second keeps its stream, its transcripts and the adapter."""
    lsc.install(
        drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT, close_models=close_models, worker=False
    )
    models = make_models(srv)
    adapter, inner = make_stt_fallback(srv, "deepgram_stt", models.http)
    models.stt = adapter
    first, _ = make_e2e_session(models, conn_options=FALLBACK_CONN_OPTIONS)
    second, audio = make_e2e_session(models, conn_options=FALLBACK_CONN_OPTIONS)
    heard: list[str] = []
    second.on("user_input_transcribed", lambda ev: ev.is_final and heard.append(ev.transcript))
    try:
        await first.start(E2EAgent(E2EContext()))
        assert await srv.await_open("deepgram_stt", 1, 10.0)  # the first's recovery stream
        await second.start(E2EAgent(E2EContext()))
        assert await srv.await_open("inference_stt", 2, 10.0)
        # the ledger counts the recovery stream for the session that started it
        assert lsc.open_streams(first)["stt"] == 3 and lsc.open_streams(second)["stt"] == 2
        await _bounded_close(first)
        await asyncio.sleep(1.0)
        assert srv.open_connections("deepgram_stt") == 0
        assert srv.open_connections("inference_stt") == 1  # the second's stream
        report = lsc.last_close_report(first)
        assert report is not None and any(s.name == "fallback.recovery.cancel" for s in report.steps)
        await audio.speak(0.8)
        assert await _eventually(lambda: bool(heard), 5.0), "the second session stopped transcribing"
        await _bounded_close(second)
        assert await srv.await_open("inference_stt", 0, 1.0)
    finally:
        await asyncio.gather(*(m.aclose() for m in inner), return_exceptions=True)
        await models.aclose()


@pytest.mark.timeout(40)
@pytest.mark.asyncio
async def test_shared_tts_adapter_still_recovers_for_the_other_session(srv: ProviderServer) -> None:
    """The first session closes mid-reply (its probe is not started); the second, on the
    same adapter, still speaks, and its own reply's probe recovers the primary."""
    lsc.install(drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT, worker=False)
    with ProviderServer() as psrv:
        models = make_models(srv)
        primary = make_tts(psrv, models.http)
        adapter = tts.FallbackAdapter([primary, models.tts], max_retry_per_tts=0)
        availability: list[bool] = []
        adapter.on("tts_availability_changed", lambda ev: availability.append(ev.available))
        models.tts = adapter
        first, _ = make_e2e_session(models, conn_options=FALLBACK_CONN_OPTIONS)
        second, _ = make_e2e_session(models, conn_options=FALLBACK_CONN_OPTIONS)
        release = asyncio.Event()

        async def parked() -> Any:
            yield "Hello there, this is a long answer. "
            await release.wait()

        psrv.refuse_kinds = frozenset({"inference_tts"})
        try:
            await first.start(E2EAgent(E2EContext()))
            await second.start(E2EAgent(E2EContext()))
            # the primary is refused during the first reply (its attempt and its probe), then back
            await asyncio.wait_for(first.say("hello there").wait_for_playout(), 10.0)
            assert availability == [False]
            assert await _eventually(lambda: _probed(adapter), 5.0)
            psrv.refuse_kinds = frozenset()
            requests = psrv.total_connections("inference_tts")
            first.say(parked())
            await asyncio.sleep(0.5)
            await _bounded_close(first)
            assert psrv.total_connections("inference_tts") == requests  # no probe from the close
            await asyncio.wait_for(second.say("still here").wait_for_playout(), 10.0)
            assert await _eventually(lambda: availability == [False, True], 5.0), "no probe recovered it"
            await _bounded_close(second)
        finally:
            release.set()
            await asyncio.gather(primary.aclose(), return_exceptions=True)
            await models.aclose()


def _probed(adapter: Any) -> bool:
    tasks = recovery_tasks(adapter)
    return bool(tasks) and all(t.done() for t in tasks)


async def _eventually(cond: Any, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
