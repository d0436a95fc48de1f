"""The stand-in provider server every stand-in test drives, one per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livekit_safeclose.testing.standins import ProviderServer


@pytest.fixture
def srv() -> Iterator[ProviderServer]:
    with ProviderServer() as server:
        yield server
