"""End-to-end tests: the real plugins over real 127.0.0.1 sockets against the stand-ins.

Every test gets a fresh `ProviderServer` (port 0); `stop()` is bounded whatever a stuck
vanilla session is still doing, and the root conftest uninstalls the layer after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livekit_safeclose.testing.standins import ProviderServer


@pytest.fixture
def srv() -> Iterator[ProviderServer]:
    server = ProviderServer().start()
    try:
        yield server
    finally:
        server.stop()
