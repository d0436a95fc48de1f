"""The websocket side every websocket stand-in shares: gate, receive loop, close.

A protocol is a `WsProtocol` subclass that reacts to messages; everything the
tests measure about a connection's life (stalls, quota refusals, who closed, how
long the close ack took, idle closes) is decided here, once, so every protocol
counts and stalls the same way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import aiohttp
from aiohttp import WSMsgType, web

from ._ledger import Conn
from ._types import Kind

if TYPE_CHECKING:
    from typing import TypeAlias

    from .server import ProviderServer

    # annotations only: livekit-agents allows aiohttp~=3.10, whose older releases have
    # no generic WebSocketResponse to subscript at runtime
    Websocket: TypeAlias = web.WebSocketResponse[bool]

__all__ = [
    "QUOTA_ERROR_CODE",
    "QUOTA_ERROR_MESSAGE",
    "MessageHooks",
    "WsProtocol",
    "ack_close",
    "hold_until_dropped",
    "idle_watchdog",
    "open_websocket",
    "receive_until_closed",
    "send_json",
    "slow_close_pause",
]

QUOTA_ERROR_CODE: Final = 429
QUOTA_ERROR_MESSAGE: Final = "concurrent session quota exceeded"


async def send_json(ws: Websocket, payload: dict[str, Any]) -> bool:
    """Send one JSON text frame; False (never an exception) once the client is gone."""
    if ws.closed:
        return False
    try:
        await ws.send_str(json.dumps(payload))
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        return False
    return True


class MessageHooks(Protocol):
    """What `receive_until_closed` calls for each frame the client sends."""

    def on_close_frame(self) -> None: ...

    async def on_binary(self, data: bytes) -> None: ...

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool: ...


async def receive_until_closed(
    server: ProviderServer, conn: Conn, ws: Websocket, hooks: MessageHooks
) -> None:
    """The one receive loop: dispatch frames until a hook ends it or the socket does.

    A client close frame is answered here (after `slow_close`), a frame that is not
    JSON or not an object is skipped, and an error or an already-closed socket ends
    the loop quietly: releasing the connection is the handler's job.
    """
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.CLOSE:
            hooks.on_close_frame()
            await ack_close(server, conn, ws)
            return
        if msg.type == WSMsgType.BINARY:
            await hooks.on_binary(bytes(msg.data))
            continue
        if msg.type != WSMsgType.TEXT:
            return
        try:
            data = json.loads(msg.data)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        if await hooks.on_message(data.get("type"), data):
            return


async def slow_close_pause(server: ProviderServer, conn: Conn) -> None:
    """Delay an acknowledgement by `slow_close` (logged, so tests can see it happened)."""
    delay = server.slow_close
    if delay > 0:
        conn.log("slow_close", f"{delay:g}s")
        await asyncio.sleep(delay)


async def ack_close(server: ProviderServer, conn: Conn, ws: Websocket) -> None:
    """Answer the client's close frame, `slow_close` seconds late; under the
    `no_close_ack` stall never: the socket is held until the client drops it."""
    if server._stall_for(conn.kind) == "no_close_ack":
        conn.log("stall:no_close_ack")
        await hold_until_dropped(server, conn)
        return
    await slow_close_pause(server, conn)
    await ws.close()


async def hold_until_dropped(server: ProviderServer, conn: Conn) -> None:
    """Answer nothing until the client drops the connection (or the server stops)."""
    while not server._stopping:
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.05)


async def idle_watchdog(server: ProviderServer, conn: Conn, on_idle: Callable[[], Awaitable[None]]) -> None:
    """Close a connection that received no audio for `idle_close_after` seconds."""
    while True:
        await asyncio.sleep(0.02)
        limit = server.idle_close_after
        if limit is not None and time.monotonic() - conn.last_audio >= limit:
            conn.server_closed = True
            conn.log("idle_close")
            await on_idle()
            return


async def open_websocket(server: ProviderServer, conn: Conn, request: web.Request) -> web.StreamResponse:
    """The gate every websocket kind passes: stall(no_handshake) -> quota -> upgrade.

    Returns the prepared websocket, or the HTTP response to answer with instead.
    An "error_frame" quota refusal upgrades and sets `conn.server_closed`, so the
    protocol refuses in-band.
    """
    if server._stall_for(conn.kind) == "no_handshake":
        conn.ledger.mark_open(conn)
        conn.log("stall:no_handshake")
        await server._hold(request)
        return web.Response(status=503, text="stalled")
    if not conn.ledger.reserve_open(conn, server.stt_quota):
        if server.quota_mode == "http429":
            conn.log("rejected:http429")
            return web.json_response({"error": QUOTA_ERROR_MESSAGE}, status=429, reason="Too Many Requests")
        conn.log("rejected:error_frame")
        conn.ledger.mark_open(conn)  # accepted, then refused in-band
        conn.server_closed = True
    # autoclose=False: we answer close frames ourselves so slow_close can delay them
    ws: Websocket = web.WebSocketResponse(autoclose=False, timeout=2.0, max_msg_size=16 * 1024 * 1024)
    conn.ws = ws
    await ws.prepare(request)
    conn.log("open")
    return ws


class WsProtocol:
    """One websocket provider protocol; an instance serves one accepted connection.

    Subclasses set `kind`, override the hooks they need and, for the route table,
    expose `Route("GET", path, TheProtocol.handle)`. Declaring `goodbye_messages`
    and `close_frame_is_goodbye` is what lets the never_answer stall still count a
    client's goodbye as a clean close without knowing the protocol.
    """

    kind: ClassVar[Kind]
    goodbye_messages: ClassVar[frozenset[str]] = frozenset()
    close_frame_is_goodbye: ClassVar[bool] = False

    def __init__(self, server: ProviderServer, conn: Conn, ws: Websocket, request: web.Request) -> None:
        self.server = server
        self.conn = conn
        self.ws = ws
        self.request = request

    @classmethod
    async def handle(cls, server: ProviderServer, request: web.Request) -> web.StreamResponse:
        """The route handler: auth -> gate -> quota refusal | stall | the protocol itself."""
        with server._ledger.track(cls.kind, request) as conn:
            refusal = cls.refuse_unauthorized(server, request)
            if refusal is not None:
                conn.log("unauthorized")
                return refusal
            ws = await open_websocket(server, conn, request)
            if not isinstance(ws, web.WebSocketResponse):
                return ws
            if conn.server_closed:  # quota, error_frame mode
                await cls.refuse_over_quota(ws)
            elif server._stall_for(conn.kind) == "never_answer":
                conn.log("stall:never_answer")
                await receive_until_closed(server, conn, ws, _NeverAnswer(cls, conn))
            else:
                await cls(server, conn, ws, request).serve()
            return ws

    @classmethod
    def refuse_unauthorized(cls, server: ProviderServer, request: web.Request) -> web.StreamResponse | None:
        """The HTTP answer for a request without valid credentials; None lets it in."""
        return None

    @classmethod
    async def refuse_over_quota(cls, ws: Websocket) -> None:
        """Tell an upgraded client it is over quota, in the protocol's words, and close."""
        await ws.close()

    async def serve(self) -> None:
        await receive_until_closed(self.server, self.conn, self.ws, self)

    # ---------------------------------------------------------------- hooks

    def on_close_frame(self) -> None:
        if self.close_frame_is_goodbye:
            self.conn.clean = True
        self.conn.log("client_close_frame")

    async def on_binary(self, data: bytes) -> None:
        """Binary frames are ignored unless the protocol carries audio in them."""

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool:
        """Handle one JSON message; True ends the connection (the protocol closed it)."""
        return False

    # ---------------------------------------------------------------- helpers

    async def send(self, payload: dict[str, Any]) -> bool:
        return await send_json(self.ws, payload)

    def said_goodbye(self, name: str) -> None:
        """The client's goodbye message arrived: the close counts as clean."""
        self.conn.clean = True
        self.conn.log(name)

    def watch_idle(self, on_idle: Callable[[], Awaitable[None]]) -> None:
        """Start the `idle_close_after` watchdog for this connection."""
        self.conn.spawn(idle_watchdog(self.server, self.conn, on_idle))


class _NeverAnswer:
    """Hooks for the never_answer stall: read and drop everything, answer only the close."""

    def __init__(self, protocol: type[WsProtocol], conn: Conn) -> None:
        self.protocol = protocol
        self.conn = conn

    def on_close_frame(self) -> None:
        if self.protocol.close_frame_is_goodbye:
            self.conn.clean = True

    async def on_binary(self, data: bytes) -> None:
        pass

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool:
        if isinstance(msg_type, str) and msg_type in self.protocol.goodbye_messages:
            self.conn.clean = True
            self.conn.log(msg_type)
        return False
