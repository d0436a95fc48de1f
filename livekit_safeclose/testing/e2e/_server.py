"""Reading a stand-in server's counts: the provider's view every e2e measurement rests on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..standins import KINDS, Kind, ProviderServer

#: time the server thread gets to account for a connection the client just dropped
SERVER_GRACE = 0.05

#: how often a watch reads the server's counts
POLL = 0.02


def counts(server: ProviderServer) -> dict[str, dict[Kind, int]]:
    """Per kind: connections so far, clean closes so far, quota refusals so far."""
    return {
        "total": {k: server.total_connections(k) for k in KINDS},
        "clean": {k: server.clean_closes(k) for k in KINDS},
        "rejected": {k: server.rejected(k) for k in KINDS},
    }


def upgrades(server: ProviderServer, kind: Kind) -> int:
    """Websocket upgrades the server completed for ``kind`` (quota refusals in the
    default ``http429`` mode never get one)."""
    return sum(e.startswith("open#") for e in server.events(kind))


async def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True
