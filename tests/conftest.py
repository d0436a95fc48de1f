"""Shared test setup: every test leaves livekit-agents unpatched, whatever it did."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import livekit_safeclose as lsc


@pytest.fixture(autouse=True)
def _restore_upstream() -> Iterator[None]:
    yield
    lsc.uninstall()
