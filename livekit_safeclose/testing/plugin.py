"""pytest plugin: put your own ``Agent`` under close faults in your own CI.

Registered through the ``pytest11`` entry point but opt-in: nothing changes in a suite until a
test asks for the ``safeclose`` fixture (optionally configured with the ``safeclose`` marker).

    @pytest.mark.asyncio
    @pytest.mark.safeclose(drain_timeout=0.5, close_timeout=3.0)
    async def test_my_agent_closes(safeclose):
        session = await safeclose.start(MyAgent())
        await safeclose.call_tool(session, "book_table", {"party": 4})
        await safeclose.assert_closes_cleanly(session, path="aclose")
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .harness import SafeCloseHarness

_MARKER = "safeclose"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(drain_timeout=0.5, close_timeout=3.0, layer=True): configure the safeclose "
        "fixture (layer=False runs on vanilla livekit-agents)",
    )


@pytest.fixture
def safeclose(request: pytest.FixtureRequest) -> Iterator[SafeCloseHarness]:
    """A :class:`SafeCloseHarness`; installs the layer for the test unless ``layer=False``."""
    # imported here, so that merely having the package installed costs a suite nothing
    from ._runs import LayerForRun
    from .harness import SafeCloseHarness

    marker = request.node.get_closest_marker(_MARKER)
    kw: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    harness = SafeCloseHarness(
        drain_timeout=float(kw.get("drain_timeout", 0.5)),
        close_timeout=float(kw.get("close_timeout", 3.0)),
        layer=bool(kw.get("layer", True)),
    )
    layer = LayerForRun(
        harness.layer, drain_timeout=harness.drain_timeout, close_timeout=harness.close_timeout
    )
    try:
        yield harness
    finally:
        harness.release()
        layer.restore()
