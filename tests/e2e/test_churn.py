"""Session churn against a provider's concurrent-connection quota.

Six sessions in turn, every other one with a tool stuck forever (reached through the real
LLM plugin), each closed with `aclose()`, while the STT stand-in accepts at most two
concurrent connections. On vanilla every stuck session keeps its STT connection, so the
quota runs out and later sessions are refused; with the layer every session connects.
"""

from __future__ import annotations

import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT

from livekit_safeclose.testing.e2e import run_churn
from livekit_safeclose.testing.standins import ProviderServer

SESSIONS = 6
QUOTA = 2


@pytest.mark.timeout(40)
@pytest.mark.asyncio
async def test_layer_frees_each_connection_so_every_session_connects(srv: ProviderServer) -> None:
    out = await run_churn(
        patched=True,
        server=srv,
        sessions=SESSIONS,
        quota=QUOTA,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
    )
    assert out.connected == [True] * SESSIONS, out
    assert all(out.closed), out
    assert out.rejected == 0 and out.stt_errors == 0, out
    assert await srv.await_open("inference_stt", 0, CLOSE_TIMEOUT)


@pytest.mark.vanilla
@pytest.mark.timeout(40)
@pytest.mark.asyncio
async def test_vanilla_stuck_sessions_exhaust_the_quota(srv: ProviderServer) -> None:
    out = await run_churn(patched=False, server=srv, sessions=SESSIONS, quota=QUOTA)
    # sessions 0 and 2 are stuck and hold the two connections the quota allows
    assert out.closed == [not s for s in out.stuck], out
    assert out.connected[:3] == [True, True, True], out
    assert out.connected[3:] == [False, False, False], out
    assert out.rejected >= 3 and out.stt_errors >= 3, out
    assert out.stt_open_end == QUOTA, out
