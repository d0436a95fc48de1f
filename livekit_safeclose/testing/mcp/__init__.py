"""Real MCP stand-ins, written with the ``mcp`` SDK (the ``mcp`` extra of livekit-agents).

    _sdk.py          the SDK ``MCPServer`` both serve: ``mcp_lookup`` answers, ``hang`` never does
    stdio_server.py  the stdio server script ``MCPServerStdio`` runs as its subprocess
    stdio.py         the test side of it: command line, status file (pid, events), liveness
    http_server.py   the SDK's streamable-HTTP app under uvicorn on 127.0.0.1 (port 0), in a
                     thread, with the server's count of open TCP connections
    standin.py       :class:`MCPStandin`: either transport behind one interface

Both take ``stubborn=True`` for a shutdown that is ignored: the stdio child outlives its
stdin closing and SIGTERM; the HTTP server never answers the session ``DELETE``.
"""

from ._sdk import HANG_TOOL, LOOKUP_TOOL, build_server
from .http_server import MCPHTTPServer
from .standin import MCPStandin, MCPTransport
from .stdio import StdioStandin, pid_alive

__all__ = [
    "HANG_TOOL",
    "LOOKUP_TOOL",
    "MCPHTTPServer",
    "MCPStandin",
    "MCPTransport",
    "StdioStandin",
    "build_server",
    "pid_alive",
]
