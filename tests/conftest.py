"""Shared test setup: every test leaves livekit-agents unpatched, whatever it did."""

from __future__ import annotations

import ast
import gc
import sys
from collections.abc import Iterator
from typing import Any

import pytest

if sys.version_info < (3, 11, 8) and sys.version_info >= (3, 11):
    # CPython < 3.11.8 keeps ast.parse's recursion counter in shared state: a collection that
    # runs a finalizer while pytest parses a source file to format a failure aborts the xdist
    # run with "AST constructor recursion depth mismatch" (python/cpython gh-106905).
    _parse = ast.parse

    def _parse_without_gc(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return _parse(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    ast.parse = _parse_without_gc  # type: ignore[assignment]

import livekit_safeclose as lsc


@pytest.fixture(autouse=True)
def _restore_upstream() -> Iterator[None]:
    yield
    lsc.uninstall()
