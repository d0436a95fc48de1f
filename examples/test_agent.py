"""The example agent under close faults, with the livekit-safeclose pytest plugin.

Run: `pytest examples/`. The `safeclose` fixture starts the agent in a roomless session on
fault-injecting fakes (or your own plugins), `call_tool` drives a turn in which the LLM
calls the tool, and `assert_closes_cleanly` closes along a close path and fails with the
close report and the post-close audit when anything is left behind.
"""

from __future__ import annotations

import pytest
from agent import BookingAgent


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.safeclose(drain_timeout=0.5, close_timeout=3.0)
@pytest.mark.parametrize("path", ["aclose", "shutdown", "disconnect"])
async def test_booking_agent_closes_while_the_api_hangs(safeclose, path) -> None:  # type: ignore[no-untyped-def]
    session = await safeclose.start(BookingAgent())
    await safeclose.call_tool(session, "book_table", {"party": 4})
    await safeclose.assert_closes_cleanly(session, path=path)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.safeclose(layer=False)
async def test_without_the_layer_it_hangs(safeclose) -> None:  # type: ignore[no-untyped-def]
    session = await safeclose.start(BookingAgent())
    await safeclose.call_tool(session, "book_table", {"party": 2})
    with pytest.raises(AssertionError, match="did not return"):
        await safeclose.assert_closes_cleanly(session, within=1.0)
