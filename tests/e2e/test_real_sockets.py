"""A forced close over real sockets: the provider must see the STT connection end.

Each scenario runs twice against a fresh stand-in server: with the layer the close
returns within the close bound and the SERVER holds no STT connection within the close
bound of the close; on vanilla livekit-agents the close is still hanging after a bounded
wait and the server still holds the connection (so the test bites).
"""

from __future__ import annotations

import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT, MARGIN, VANILLA_WAIT

from livekit_safeclose.testing.e2e import E2E_SCENARIOS, E2EOutcome, STTKind, run_e2e_scenario
from livekit_safeclose.testing.standins import ProviderServer

BITING = ["tool-stuck", "on-exit-hang", "tts-stall-goodbye", "llm-stall-goodbye"]
CONTROLS = [s.id for s in E2E_SCENARIOS.values() if not s.vanilla_hangs and not s.realtime]
CASES: list[tuple[str, STTKind]] = [(s, "inference_stt") for s in BITING] + [("tool-stuck", "deepgram_stt")]


async def _run(
    name: str, srv: ProviderServer, *, patched: bool, stt: STTKind, observe: float = 0.0
) -> E2EOutcome:
    return await run_e2e_scenario(
        name,
        patched=patched,
        server=srv,
        stt=stt,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        limit=CLOSE_TIMEOUT + MARGIN if patched else VANILLA_WAIT,
        observe=observe,
    )


@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "stt"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
async def test_layer_closes_and_provider_sees_the_stt_connection_end(
    srv: ProviderServer, name: str, stt: STTKind
) -> None:
    out = await _run(name, srv, patched=True, stt=stt, observe=CLOSE_TIMEOUT)
    assert out.engaged and not out.error, out.summary()
    assert out.stt_open_before == 1, out.summary()
    assert out.closed and out.ms <= (CLOSE_TIMEOUT + MARGIN) * 1000, out.summary()
    # the provider's view: the connection is gone within the close bound of the close
    assert out.stt_zero_ms is not None and out.stt_zero_ms <= CLOSE_TIMEOUT * 1000, out.summary()
    assert (
        out.stt_open_after == 0
        and out.stt_reconnects_during_close == 0
        and out.stt_reconnects_after_close == 0
    ), out.summary()
    # and it was a goodbye (session.close / CloseStream), not a dropped socket
    assert out.clean_closes[stt] == 1, out.summary()
    assert out.close_events == 1, out.summary()
    assert out.report is not None and out.report.forced, out.summary()


@pytest.mark.vanilla
@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "stt"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
async def test_vanilla_keeps_the_stt_connection_open(srv: ProviderServer, name: str, stt: STTKind) -> None:
    out = await _run(name, srv, patched=False, stt=stt)
    assert out.engaged and not out.error, out.summary()
    assert not out.closed, out.summary()
    assert out.stt_open_at_close == 1 and out.stt_zero_ms is None, out.summary()
    assert out.clean_closes[stt] == 0 and out.close_events == 0, out.summary()


@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize("name", CONTROLS)
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_stall_while_replying_is_reached_by_the_interrupt(
    srv: ProviderServer, name: str, patched: bool
) -> None:
    """Control: a provider that stalls while a reply is generating does not hang even
    vanilla: the forced interrupt cancels the reply and the plugins' streams end on
    cancel. Nothing is forced, and the STT connection ends with a goodbye at once."""
    out = await _run(name, srv, patched=patched, stt="inference_stt", observe=0.3)
    assert out.engaged and not out.error, out.summary()
    assert out.closed and out.ms <= 1000, out.summary()
    assert out.stt_open_at_close == 0 and out.stt_open_after == 0, out.summary()
    assert out.clean_closes["inference_stt"] == 1 and out.close_events == 1, out.summary()
    if patched:
        assert out.report is not None and not out.report.forced, out.summary()
