"""One MCP stand-in of either transport, as a test or an e2e run uses it: started, turned
into the real livekit ``MCPServer`` that talks to it, read from the server's side, stopped."""

from __future__ import annotations

from typing import Any, Literal

from ._sdk import HANG_TOOL
from .http_server import MCPHTTPServer
from .stdio import StdioStandin

MCPTransport = Literal["stdio", "http"]

#: the MCP client's request timeout: the stdio child imports the SDK first, which takes
#: seconds on a loaded box (upstream's default is 5 s)
CLIENT_TIMEOUT = 30.0


class MCPStandin:
    """A stdio child (started by ``MCPServerStdio`` itself) or an HTTP server on 127.0.0.1.
    ``stubborn``: its shutdown is ignored (see the two stand-ins)."""

    def __init__(self, transport: MCPTransport, *, stubborn: bool = False) -> None:
        self.transport: MCPTransport = transport
        self.stubborn = stubborn
        self.stdio: StdioStandin | None = None
        self.http: MCPHTTPServer | None = None

    def start(self) -> MCPStandin:
        if self.transport == "stdio":
            self.stdio = StdioStandin(stubborn=self.stubborn)
        else:
            self.http = MCPHTTPServer(stubborn=self.stubborn).start()
        return self

    def server(self, **kwargs: Any) -> Any:
        """The real livekit ``MCPServerStdio`` / ``MCPServerHTTP`` for this stand-in."""
        from livekit.agents.llm.mcp import MCPServerHTTP, MCPServerStdio

        kwargs.setdefault("client_session_timeout_seconds", CLIENT_TIMEOUT)
        if self.stdio is not None:
            return MCPServerStdio(self.stdio.command, self.stdio.args, **kwargs)
        assert self.http is not None, "start() first"
        return MCPServerHTTP(self.http.url, transport_type="streamable_http", **kwargs)

    def toolset(self, **kwargs: Any) -> Any:
        """An ``MCPToolset`` on :meth:`server` (the tools' default flags: not cancellable)."""
        from livekit.agents.llm.mcp import MCPToolset

        return MCPToolset(id=f"mcp_{self.transport}", mcp_server=self.server(**kwargs))

    # -- the server's side ----------------------------------------------------------------
    def events(self) -> list[str]:
        if self.stdio is not None:
            return self.stdio.events()
        return self.http.events() if self.http is not None else []

    def calls(self, tool: str = HANG_TOOL) -> int:
        return sum(e == f"call {tool}" for e in self.events())

    @property
    def pid(self) -> int | None:
        return self.stdio.pid if self.stdio is not None else None

    def child_alive(self) -> bool:
        """The stdio child still runs (``False`` for HTTP)."""
        return self.stdio is not None and self.stdio.alive()

    def open_connections(self) -> int:
        """TCP connections the HTTP server holds open (0 for stdio)."""
        return self.http.open_connections() if self.http is not None else 0

    def stop(self) -> None:
        """Test cleanup, bounded: the stdio child killed by its pid, the HTTP server stopped."""
        if self.stdio is not None:
            self.stdio.cleanup()
        if self.http is not None:
            self.http.stop()
