"""`ProviderServer`: one threaded aiohttp app serving every stand-in protocol.

One app on one port, so a single set of counters describes what the agent did to
all of its providers. It runs in its own thread with its own event loop, so a test
whose loop is blocked (the very failure the library guards against) cannot starve
the provider side, and `stop()` stays bounded whatever the clients are doing.

Switches are plain attributes, read by the server thread at each decision point
(attribute stores are atomic under the GIL), so they can be flipped mid-test.

The protocol modules reach the server through its underscore members (`_ledger`,
`_stall_for`, `_hold`, `_verifier`, `_next_reply`, `_record_llm_request`): they are
private to this package, not to this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, cast

from aiohttp import WSCloseCode, web
from livekit import api

from . import deepgram, inference_stt, inference_tts, openai_chat, openai_realtime
from ._ledger import ConnectionLedger, LogEntry
from ._llm import LLMReply, LLMRequest
from ._switches import Switches
from ._types import Handler, InferenceCredentials, Kind, Route, StallMode

__all__ = ["DEFAULT_API_KEY", "DEFAULT_API_SECRET", "DEFAULT_PROVIDER_KEY", "ROUTES", "ProviderServer"]

# HS256 wants >= 32 bytes of secret or PyJWT warns; any key/secret pair works.
DEFAULT_API_KEY: Final = "standin-api-key"
DEFAULT_API_SECRET: Final = "standin-api-secret-0123456789abcdef0123456789"
DEFAULT_PROVIDER_KEY: Final = "standin-provider-key"

_SHUTDOWN_BUDGET: Final = 1.4  # seconds stop() waits for the server loop before giving up

# Every endpoint served; a new protocol module adds its ROUTES here.
ROUTES: Final[tuple[Route, ...]] = (
    *inference_stt.ROUTES,
    *inference_tts.ROUTES,
    *deepgram.ROUTES,
    *openai_chat.ROUTES,
    *openai_realtime.ROUTES,
)


class ProviderServer(Switches):
    """Threaded stand-in for LiveKit Inference (STT/TTS/LLM), Deepgram and OpenAI (chat
    completions and the Realtime websocket).

    Counter semantics, per kind:
      * total_connections: every request that reached the route, including ones
        refused by auth or quota and ones held by a stall (so client retries show).
      * open_connections: connections the server currently holds: upgraded (or
        upgrading) websockets, upgrade requests held by the no_handshake stall, and
        in-flight LLM requests.
      * clean_closes: the client said goodbye before the socket went away:
        `session.close` (inference STT), `CloseStream` (Deepgram), a client-initiated
        close frame (inference TTS, whose protocol has no goodbye message and whose
        pooled sockets are closed with a bare close frame), a completed stream
        (LLM, `[DONE]` written), a client close frame (OpenAI Realtime).
      * rejected: quota refusals (either mode) and outage refusals (`refuse_kinds`).

    Switches: see :class:`~._switches.Switches`, its base.
    """

    def __init__(
        self,
        *,
        transcript_text: str = "hello there",
        api_key: str = DEFAULT_API_KEY,
        api_secret: str = DEFAULT_API_SECRET,
        provider_api_key: str = DEFAULT_PROVIDER_KEY,
        host: str = "127.0.0.1",
    ) -> None:
        self.api_key: Final = api_key
        self.api_secret: Final = api_secret
        self.provider_api_key: Final = provider_api_key
        self.host: Final = host
        super().__init__(transcript_text)
        self._ledger = ConnectionLedger()
        self._llm_lock = threading.Lock()
        self._llm_script: list[LLMReply] = []
        self._llm_requests: list[LLMRequest] = []
        self._realtime_script: list[LLMReply] = []
        self._verifier = api.TokenVerifier(api_key, api_secret)

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ProviderServer:
        """Bind 127.0.0.1:0 and serve from a dedicated thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("ProviderServer already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._stopping = False
        thread = threading.Thread(
            target=self._thread_main, args=(ready, errors), name="standin-providers", daemon=True
        )
        self._thread = thread
        thread.start()
        if not ready.wait(10.0) or errors:
            self._thread = None
            raise RuntimeError("stand-in provider server failed to start") from (
                errors[0] if errors else None
            )
        return self

    def stop(self) -> None:
        """Close every connection and stop the thread; bounded (< 2 s) whatever clients do."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping = True
        deadline = time.monotonic() + _SHUTDOWN_BUDGET
        with contextlib.suppress(RuntimeError):  # loop already closed
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(timeout=max(0.05, deadline - time.monotonic()))
            except Exception:  # timeout or a failing cleanup: we tear down regardless
                fut.cancel()
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=max(0.1, deadline + 0.4 - time.monotonic()))
        self._thread = None
        self._loop = None

    def __enter__(self) -> ProviderServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ------------------------------------------------------------------ addresses & credentials

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ProviderServer not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def inference_url(self) -> str:
        """`base_url=` for inference.STT/TTS/LLM: they append /stt, /tts, /chat/completions
        and rewrite http->ws themselves (the real default is https://.../v1)."""
        return f"{self.base_url}/v1"

    @property
    def deepgram_url(self) -> str:
        """`base_url=` for deepgram.STT: the full listen endpoint (query string is appended)."""
        return f"{self.base_url}/v1/listen"

    @property
    def openai_url(self) -> str:
        """`base_url=` for openai.LLM (the SDK appends /chat/completions) and for
        openai.realtime.RealtimeModel (the client makes it ws://.../v1/realtime)."""
        return f"{self.base_url}/v1"

    def inference_credentials(self) -> InferenceCredentials:
        """kwargs for inference.STT/TTS/LLM: the client signs a JWT the server verifies."""
        return InferenceCredentials(api_key=self.api_key, api_secret=self.api_secret)

    # ------------------------------------------------------------------ counters & log

    def open_connections(self, kind: Kind) -> int:
        return self._ledger.open_connections(kind)

    def total_connections(self, kind: Kind) -> int:
        return self._ledger.total_connections(kind)

    def clean_closes(self, kind: Kind) -> int:
        return self._ledger.clean_closes(kind)

    def rejected(self, kind: Kind) -> int:
        return self._ledger.rejected(kind)

    @property
    def log(self) -> list[LogEntry]:
        """Snapshot of the event log (oldest first)."""
        return self._ledger.entries()

    def events(self, kind: Kind) -> list[str]:
        """Event names logged for one kind, in order (handy for asserts)."""
        return self._ledger.events(kind)

    def wait_open(self, kind: Kind, count: int, timeout: float) -> bool:
        """Block until exactly `count` connections of `kind` are open; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.open_connections(kind) == count:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    async def await_open(self, kind: Kind, count: int, timeout: float) -> bool:
        """`wait_open` for the test's event loop: polls with asyncio.sleep, never blocks it."""
        deadline = time.monotonic() + timeout
        while True:
            if self.open_connections(kind) == count:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ LLM script

    @property
    def llm_script(self) -> list[LLMReply]:
        """The live reply queue; each request pops the head, plain "ok" once empty.
        `append`/`extend` on it are atomic under the GIL; assignment replaces it."""
        return self._llm_script

    @llm_script.setter
    def llm_script(self, replies: list[LLMReply]) -> None:
        with self._llm_lock:
            self._llm_script = list(replies)

    def script_llm(self, *replies: LLMReply) -> None:
        """Queue replies after the ones already scripted."""
        with self._llm_lock:
            self._llm_script.extend(replies)

    @property
    def llm_requests(self) -> list[LLMRequest]:
        """Snapshot of every chat-completions request received, oldest first."""
        with self._llm_lock:
            return list(self._llm_requests)

    def _next_reply(self) -> LLMReply:
        with self._llm_lock:
            if self._llm_script:
                return self._llm_script.pop(0)
        return LLMReply(text="ok")

    def _record_llm_request(self, request: LLMRequest) -> None:
        with self._llm_lock:
            self._llm_requests.append(request)

    # ------------------------------------------------------------------ Realtime script

    @property
    def realtime_script(self) -> list[LLMReply]:
        """The Realtime stand-in's reply queue (one per response), like `llm_script`."""
        return self._realtime_script

    def script_realtime(self, *replies: LLMReply) -> None:
        with self._llm_lock:
            self._realtime_script.extend(replies)

    def _next_realtime_reply(self) -> LLMReply:
        with self._llm_lock:
            if self._realtime_script:
                return self._realtime_script.pop(0)
        return LLMReply(text="ok")

    # ------------------------------------------------------------------ helpers for the protocols

    def _stall_for(self, kind: Kind) -> StallMode | None:
        mode, kinds = self.stall, self.stall_kinds
        if mode is None or (kinds is not None and kind not in kinds):
            return None
        return mode

    async def _hold(self, request: web.Request) -> None:
        """Keep a request unanswered until the client goes away (or shutdown cancels us)."""
        while not self._stopping:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ server thread

    def _thread_main(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:  # surfaced to start()
            errors.append(e)
            ready.set()
            loop.close()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=0.3))
            loop.close()

    def _bind(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """An aiohttp handler for a protocol handler, which takes the server first."""

        async def bound(request: web.Request) -> web.StreamResponse:
            return await handler(self, request)

        return bound

    async def _setup(self) -> None:
        app = web.Application()
        for route in ROUTES:
            if route.method == "GET":  # add_get also answers HEAD, as aiohttp routes usually do
                app.router.add_get(route.path, self._bind(route.handler))
            else:
                app.router.add_route(route.method, route.path, self._bind(route.handler))
        # handler_cancellation: a client that gives up on a held request cancels its
        # handler, so stalled requests stop counting as open
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=0.2,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        server = cast(Any, site)._server
        self._port = int(server.sockets[0].getsockname()[1])
        self._runner = runner

    async def _shutdown(self) -> None:
        conns = list(self._ledger.live)
        closers = [
            asyncio.create_task(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutdown"))
            for c in conns
            if c.ws is not None and not c.ws.closed
        ]
        if closers:
            await asyncio.wait(closers, timeout=0.3)
            for t in closers:
                t.cancel()
        me = asyncio.current_task()
        handlers: list[asyncio.Task[Any]] = []
        for c in conns:
            if c.transport is not None:
                c.transport.abort()
            for h in c.helpers:
                h.cancel()
            if c.task is not None and c.task is not me and not c.task.done():
                c.task.cancel()
                handlers.append(c.task)
        if handlers:
            await asyncio.wait(handlers, timeout=0.3)
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), 0.5)
