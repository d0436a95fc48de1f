"""The MCP server both stand-ins serve, written with the ``mcp`` SDK's own ``MCPServer``.

Two tools: ``mcp_lookup`` answers at once, ``hang`` never answers (it parks until the client
cancels the request, which the SDK delivers as a cancellation of the handler). Each call,
and each cancellation, is reported through ``record`` so a test can tell that the agent's
tool call reached the server and what became of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

#: the tool whose call never answers
HANG_TOOL = "hang"
#: the tool that answers
LOOKUP_TOOL = "mcp_lookup"


def build_server(record: Callable[[str], None]) -> Any:
    """An SDK ``MCPServer`` with the ``mcp_lookup`` and ``hang`` tools."""
    import anyio
    from mcp.server.mcpserver import MCPServer

    # the SDK's constructor configures the root logger (a rich handler): not in a test process
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        server = MCPServer("safeclose-standin", log_level="WARNING")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)

    @server.tool(name=LOOKUP_TOOL, description="Look something up.")
    async def mcp_lookup() -> str:
        record(f"call {LOOKUP_TOOL}")
        return "found it"

    @server.tool(name=HANG_TOOL, description="Look something up slowly.")
    async def hang() -> str:
        record(f"call {HANG_TOOL}")
        try:
            await anyio.sleep_forever()
        except BaseException:
            record(f"cancelled {HANG_TOOL}")
            raise
        return "never"  # pragma: no cover

    return server
