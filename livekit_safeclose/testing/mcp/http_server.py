"""The streamable-HTTP MCP stand-in: the SDK's own streamable-HTTP app, served by uvicorn
on 127.0.0.1 (port 0) in a thread, so the real ``MCPServerHTTP`` talks to it over real
TCP connections.

What the tests read is the server's view: :meth:`MCPHTTPServer.open_connections` is the
number of TCP connections uvicorn holds open right now (the client's POST connections and
its server-to-client SSE stream), and :meth:`events` the tool calls, cancellations and
session deletes it saw. ``stubborn``: a shutdown that is ignored: the client's session
``DELETE`` is accepted and never answered, so its connection stays open until the client
drops it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

from ._sdk import build_server

#: how long :meth:`MCPHTTPServer.start` waits for uvicorn to listen
START_TIMEOUT = 15.0
#: how long :meth:`MCPHTTPServer.stop` waits for the server thread to end
STOP_TIMEOUT = 5.0

ASGIApp = Any


class MCPHTTPServer:
    """A real streamable-HTTP MCP server on 127.0.0.1; ``url`` is its endpoint."""

    def __init__(self, *, stubborn: bool = False) -> None:
        self.stubborn = stubborn
        self._events: list[str] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    # -- the server's view -------------------------------------------------------------
    def record(self, line: str) -> None:
        with self._lock:
            self._events.append(line)

    def events(self) -> list[str]:
        with self._lock:
            return list(self._events)

    def count(self, prefix: str) -> int:
        return sum(e.startswith(prefix) for e in self.events())

    def open_connections(self) -> int:
        """TCP connections uvicorn holds open now."""
        server = self._server
        return len(server.server_state.connections) if server is not None else 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    # -- lifecycle -----------------------------------------------------------------------
    def _app(self) -> ASGIApp:
        """The SDK's streamable-HTTP app behind a gate that parks a session delete when
        the server is stubborn."""
        inner = build_server(self.record).streamable_http_app()

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] == "DELETE":
                self.record("delete" + (" (ignored)" if self.stubborn else ""))
                if self.stubborn:
                    assert self._release is not None
                    await self._release.wait()
                    return
            await inner(scope, receive, send)

        return app

    def _run(self, sock: socket.socket) -> None:
        import uvicorn

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._release = asyncio.Event()
            await self._server.serve(sockets=[sock])

        config = uvicorn.Config(self._app(), log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        asyncio.run(main())

    def start(self) -> MCPHTTPServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name="mcp-http-standin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not (self._server is not None and self._server.started):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the MCP HTTP stand-in did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Release what is parked and stop uvicorn, bounded."""
        loop, server = self._loop, self._server
        if loop is not None and self._release is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._release.set)
        if server is not None:
            server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive() and server is not None:
                server.force_exit = True
                self._thread.join(STOP_TIMEOUT)

    def __enter__(self) -> MCPHTTPServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
