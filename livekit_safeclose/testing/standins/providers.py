"""Stand-in provider servers that the REAL provider plugins talk to over 127.0.0.1.

One aiohttp application serves every protocol the tests need, so a single port
and a single set of counters describe what the agent did to its providers:

    ws   {inference_url}/stt?model=...   livekit.agents.inference.STT  (JSON frames)
    ws   {inference_url}/tts?model=...   livekit.agents.inference.TTS  (JSON frames)
    ws   {deepgram_url}?...              livekit.plugins.deepgram.STT  (binary PCM + JSON)
    POST {openai_url}/chat/completions   livekit.plugins.openai.LLM and inference.LLM (SSE)
    GET  {openai_url}/models             LLM prewarm

The server runs in its own thread with its own event loop, so a test whose loop is
blocked (the very failure the library guards against) cannot starve the provider
side, and `stop()` stays bounded whatever the clients are doing.

Switches are plain attributes, read by the server thread at each decision point
(attribute stores are atomic under the GIL), so they can be flipped mid-test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, TypedDict, cast

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from livekit import api

from ._llm import LLMReply, LLMRequest, completion_body, reply_chunks
from ._speech import SpeechDetector, Utterance
from .audio import tone_pcm16

__all__ = [
    "IDLE_CLOSE_CODE",
    "IDLE_CLOSE_MESSAGE",
    "KINDS",
    "STT_KINDS",
    "InferenceCredentials",
    "Kind",
    "LLMReply",
    "LLMRequest",
    "LogEntry",
    "ProviderServer",
    "QuotaMode",
    "StallMode",
]

Kind = Literal["inference_stt", "inference_tts", "deepgram_stt", "llm"]
StallMode = Literal["never_answer", "no_handshake"]
QuotaMode = Literal["http429", "error_frame"]

KINDS: Final[tuple[Kind, ...]] = ("inference_stt", "inference_tts", "deepgram_stt", "llm")
STT_KINDS: Final[frozenset[Kind]] = frozenset({"inference_stt", "deepgram_stt"})

IDLE_CLOSE_CODE: Final = 2007
IDLE_CLOSE_MESSAGE: Final = "session closed due to agent inactivity"
QUOTA_ERROR_CODE: Final = 429
QUOTA_ERROR_MESSAGE: Final = "concurrent session quota exceeded"
DEEPGRAM_IDLE_REASON: Final = (
    "Deepgram did not receive audio data or a text message within the timeout window."
)

# HS256 wants >= 32 bytes of secret or PyJWT warns; any key/secret pair works.
DEFAULT_API_KEY: Final = "standin-api-key"
DEFAULT_API_SECRET: Final = "standin-api-secret-0123456789abcdef0123456789"
DEFAULT_PROVIDER_KEY: Final = "standin-provider-key"

_SHUTDOWN_BUDGET: Final = 1.4  # seconds stop() waits for the server loop before giving up


class InferenceCredentials(TypedDict):
    """`**srv.inference_credentials()` for the inference clients (typed for mypy)."""

    api_key: str
    api_secret: str


class LogEntry(NamedTuple):
    """One server-side event: (time.monotonic(), kind, event)."""

    t: float
    kind: str
    event: str


@dataclass
class _Counts:
    open: int = 0
    total: int = 0
    clean: int = 0
    rejected: int = 0


@dataclass(eq=False)
class _Conn:
    """Bookkeeping for one request/connection, owned by the server thread."""

    kind: Kind
    id: int
    task: asyncio.Task[Any] | None
    transport: asyncio.Transport | None
    ws: web.WebSocketResponse[bool] | None = None
    is_open: bool = False
    clean: bool = False
    server_closed: bool = False
    last_audio: float = field(default_factory=time.monotonic)
    helpers: set[asyncio.Task[Any]] = field(default_factory=set)


class ProviderServer:
    """Threaded stand-in for LiveKit Inference (STT/TTS/LLM), Deepgram and OpenAI.

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
        (LLM, `[DONE]` written).
      * rejected: quota refusals (either mode).

    Switches (plain attributes, thread-safe to assign at any time):
      * idle_close_after: STT connections that have received no audio for this many
        seconds (counted from the last audio frame, or from the upgrade if none;
        Deepgram KeepAlive does not count) are closed by the server: inference STT
        gets `{"type": "error", "code": 2007, "message": IDLE_CLOSE_MESSAGE}` then a
        normal close frame; Deepgram gets a 1011 close with its NET-0001 reason.
      * stt_quota / quota_mode: at most `stt_quota` open STT connections PER KIND
        (inference_stt and deepgram_stt are separate providers with separate quotas).
        "http429" refuses the upgrade with HTTP 429; "error_frame" upgrades, sends an
        error (inference: `{"type": "error", "code": 429, ...}`; Deepgram: a JSON
        `{"type": "Error", ...}`), then closes (Deepgram: close code 1008).
      * stall / stall_kinds: "no_handshake" holds the HTTP request without ever
        answering (no upgrade, no LLM response headers); "never_answer" completes the
        upgrade (LLM: sends 200 + SSE headers) and then sends no application message.
        The websocket close handshake is still answered (subject to slow_close).
        `stall_kinds=None` applies the stall to every kind.
      * slow_close: seconds to wait before acknowledging a client goodbye/close:
        before `session.closed` + close frame (inference), before the final
        `Metadata` + close (Deepgram CloseStream), before answering a bare close frame.
        Only clients that await the ack notice: the TTS pool's ws.close() and the
        Deepgram drain do; STT aclose() cancels its pending receive, after which aiohttp
        drops TCP right after its own close frame.
      * finalize_delay: seconds before answering a finalize (late final transcripts).
      * llm_first_token_delay: seconds before the first LLM chunk.
      * transcript_text, speech_min_seconds, speech_rms_threshold: start of speech is
        sent on the first voiced chunk (RMS >= threshold, 0..1 scale), interim + final
        once `speech_min_seconds` of voice accumulated; a finalize flushes shorter
        pending speech as a final. A 440 Hz tone at 0.3 amplitude (RMS ~0.21) is
        speech, digital silence is not (see SpeechDetector).
      * tts_ms_per_word: duration of synthesized audio per input word.
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

        # switches
        self.idle_close_after: float | None = None
        self.stt_quota: int | None = None
        self.quota_mode: QuotaMode = "http429"
        self.stall: StallMode | None = None
        self.stall_kinds: frozenset[Kind] | None = None
        self.slow_close: float = 0.0
        self.finalize_delay: float = 0.0
        self.llm_first_token_delay: float = 0.0
        self.transcript_text: str = transcript_text
        self.speech_min_seconds: float = 0.5
        self.speech_rms_threshold: float = 0.02
        self.tts_ms_per_word: float = 60.0

        self._lock = threading.Lock()
        self._counts: dict[Kind, _Counts] = {k: _Counts() for k in KINDS}
        self._log: list[LogEntry] = []
        self._llm_script: list[LLMReply] = []
        self._llm_requests: list[LLMRequest] = []
        self._ids = itertools.count(1)
        self._verifier = api.TokenVerifier(api_key, api_secret)

        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._conns: set[_Conn] = set()  # touched only on the server thread
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
        """`base_url=` for openai.LLM: the SDK appends /chat/completions."""
        return f"{self.base_url}/v1"

    def inference_credentials(self) -> InferenceCredentials:
        """kwargs for inference.STT/TTS/LLM: the client signs a JWT the server verifies."""
        return InferenceCredentials(api_key=self.api_key, api_secret=self.api_secret)

    # ------------------------------------------------------------------ counters & log

    def open_connections(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].open

    def total_connections(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].total

    def clean_closes(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].clean

    def rejected(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].rejected

    @property
    def log(self) -> list[LogEntry]:
        """Snapshot of the event log (oldest first)."""
        with self._lock:
            return list(self._log)

    def events(self, kind: Kind) -> list[str]:
        """Event names logged for one kind, in order (handy for asserts)."""
        with self._lock:
            return [e.event for e in self._log if e.kind == kind]

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
        with self._lock:
            self._llm_script = list(replies)

    def script_llm(self, *replies: LLMReply) -> None:
        """Queue replies after the ones already scripted."""
        with self._lock:
            self._llm_script.extend(replies)

    @property
    def llm_requests(self) -> list[LLMRequest]:
        """Snapshot of every chat-completions request received, oldest first."""
        with self._lock:
            return list(self._llm_requests)

    def _next_reply(self) -> LLMReply:
        with self._lock:
            if self._llm_script:
                return self._llm_script.pop(0)
        return LLMReply(text="ok")

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

    async def _setup(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/stt", self._handle_inference_stt)
        app.router.add_get("/v1/tts", self._handle_inference_tts)
        app.router.add_get("/v1/listen", self._handle_deepgram)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
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
        conns = list(self._conns)
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

    # ------------------------------------------------------------------ bookkeeping helpers

    def _event(self, kind: Kind, event: str) -> None:
        with self._lock:
            self._log.append(LogEntry(time.monotonic(), kind, event))

    def _admit(self, kind: Kind, request: web.Request) -> _Conn:
        conn = _Conn(
            kind=kind,
            id=next(self._ids),
            task=asyncio.current_task(),
            transport=request.transport,
        )
        self._conns.add(conn)
        with self._lock:
            self._counts[kind].total += 1
            self._log.append(LogEntry(time.monotonic(), kind, f"request#{conn.id}"))
        return conn

    def _reserve_open(self, conn: _Conn) -> bool:
        """Mark `conn` open unless the STT quota is exhausted (check+increment is atomic)."""
        quota = self.stt_quota
        with self._lock:
            counts = self._counts[conn.kind]
            if conn.kind in STT_KINDS and quota is not None and counts.open >= quota:
                counts.rejected += 1
                return False
            counts.open += 1
            conn.is_open = True
            return True

    def _mark_open(self, conn: _Conn) -> None:
        with self._lock:
            self._counts[conn.kind].open += 1
            conn.is_open = True

    def _release(self, conn: _Conn) -> None:
        """Final accounting for a connection; synchronous so cancellation cannot skip it."""
        for h in conn.helpers:
            h.cancel()
        self._conns.discard(conn)
        with self._lock:
            counts = self._counts[conn.kind]
            if conn.is_open:
                counts.open -= 1
                conn.is_open = False
            if conn.clean:
                counts.clean += 1
            how = "clean" if conn.clean else ("server" if conn.server_closed else "unclean")
            self._log.append(LogEntry(time.monotonic(), conn.kind, f"closed#{conn.id}:{how}"))

    def _stall_for(self, kind: Kind) -> StallMode | None:
        mode, kinds = self.stall, self.stall_kinds
        if mode is None or (kinds is not None and kind not in kinds):
            return None
        return mode

    def _spawn(self, conn: _Conn, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a per-connection helper that `_release`/shutdown cancel with the connection."""
        task = asyncio.create_task(coro)
        conn.helpers.add(task)
        task.add_done_callback(conn.helpers.discard)
        return task

    async def _hold(self, request: web.Request) -> None:
        """Keep a request unanswered until the client goes away (or shutdown cancels us)."""
        while not self._stopping:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(0.05)

    def _authorized_inference(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        try:
            self._verifier.verify(header[len("Bearer ") :])
        except Exception:
            return False
        return True

    @staticmethod
    async def _send_json(ws: web.WebSocketResponse[bool], payload: dict[str, Any]) -> bool:
        if ws.closed:
            return False
        try:
            await ws.send_str(json.dumps(payload))
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False
        return True

    async def _ack_close(self, conn: _Conn, ws: web.WebSocketResponse[bool]) -> None:
        delay = self.slow_close
        if delay > 0:
            self._event(conn.kind, f"slow_close#{conn.id}:{delay:g}s")
            await asyncio.sleep(delay)
        await ws.close()

    async def _idle_watchdog(self, conn: _Conn, on_idle: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(0.02)
            limit = self.idle_close_after
            if limit is not None and time.monotonic() - conn.last_audio >= limit:
                conn.server_closed = True
                self._event(conn.kind, f"idle_close#{conn.id}")
                await on_idle()
                return

    async def _open_inference_ws(
        self, conn: _Conn, request: web.Request
    ) -> web.WebSocketResponse[bool] | web.StreamResponse:
        """The inference kinds' gate: the signed token first (401), then :meth:`_open_ws`."""
        if not self._authorized_inference(request):
            self._event(conn.kind, f"unauthorized#{conn.id}")
            return web.json_response({"error": "invalid token"}, status=401)
        return await self._open_ws(conn, request)

    async def _open_ws(
        self, conn: _Conn, request: web.Request
    ) -> web.WebSocketResponse[bool] | web.StreamResponse:
        """Shared gate for websocket kinds: stall(no_handshake) -> quota -> upgrade.

        Returns the prepared websocket, or the HTTP response to answer with instead.
        """
        if self._stall_for(conn.kind) == "no_handshake":
            self._mark_open(conn)
            self._event(conn.kind, f"stall:no_handshake#{conn.id}")
            await self._hold(request)
            return web.Response(status=503, text="stalled")
        if not self._reserve_open(conn):
            if self.quota_mode == "http429":
                self._event(conn.kind, f"rejected:http429#{conn.id}")
                return web.json_response(
                    {"error": QUOTA_ERROR_MESSAGE}, status=429, reason="Too Many Requests"
                )
            self._event(conn.kind, f"rejected:error_frame#{conn.id}")
            self._mark_open(conn)  # accepted, then refused in-band
            conn.server_closed = True
        # autoclose=False: we answer close frames ourselves so slow_close can delay them
        ws: web.WebSocketResponse[bool] = web.WebSocketResponse(
            autoclose=False, timeout=2.0, max_msg_size=16 * 1024 * 1024
        )
        conn.ws = ws
        await ws.prepare(request)
        self._event(conn.kind, f"open#{conn.id}")
        return ws

    async def _never_answer(self, conn: _Conn, ws: web.WebSocketResponse[bool]) -> None:
        """Read and drop everything; only the close handshake is answered."""
        self._event(conn.kind, f"stall:never_answer#{conn.id}")
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                with contextlib.suppress(ValueError, AttributeError):
                    kind = json.loads(msg.data).get("type")
                    if kind in ("session.close", "CloseStream"):
                        conn.clean = True
                        self._event(conn.kind, f"{kind}#{conn.id}")
            elif msg.type == WSMsgType.CLOSE:
                if conn.kind == "inference_tts":
                    conn.clean = True
                await self._ack_close(conn, ws)
                return
            elif msg.type != WSMsgType.BINARY:
                return

    # ------------------------------------------------------------------ inference STT

    async def _handle_inference_stt(self, request: web.Request) -> web.StreamResponse:
        conn = self._admit("inference_stt", request)
        try:
            res = await self._open_inference_ws(conn, request)
            if not isinstance(res, web.WebSocketResponse):
                return res
            ws = res
            if conn.server_closed:  # quota, error_frame mode
                await self._send_json(
                    ws, {"type": "error", "code": QUOTA_ERROR_CODE, "message": QUOTA_ERROR_MESSAGE}
                )
                await ws.close()
                return ws
            if self._stall_for(conn.kind) == "never_answer":
                await self._never_answer(conn, ws)
                return ws
            await self._inference_stt_session(conn, ws, request)
            return ws
        finally:
            self._release(conn)

    async def _inference_stt_session(
        self, conn: _Conn, ws: web.WebSocketResponse[bool], request: web.Request
    ) -> None:
        session_id = f"standin_stt_{conn.id}"
        sample_rate = 16000
        language = "en"
        detector = SpeechDetector(sample_rate=sample_rate)

        def transcript(kind: str, utt: Utterance) -> dict[str, Any]:
            return {
                "type": kind,
                "session_id": session_id,
                "request_id": session_id,
                "transcript": utt.text,
                "language": language,
                "start": utt.start,
                "duration": utt.duration,
                "confidence": 0.99,
                "words": [{"word": w, "start": s, "end": e, "confidence": 0.99} for w, s, e in utt.words()],
            }

        async def idle() -> None:
            await self._send_json(
                ws, {"type": "error", "code": IDLE_CLOSE_CODE, "message": IDLE_CLOSE_MESSAGE}
            )
            await ws.close()

        async def finalize() -> None:
            if self.finalize_delay > 0:
                await asyncio.sleep(self.finalize_delay)
            pending = detector.has_pending
            utt = detector.finalize(text=self.transcript_text)
            if utt is not None:
                if not pending:
                    await self._send_json(ws, {"type": "start_of_speech", "session_id": session_id})
                self._event(conn.kind, f"final#{conn.id}:finalize")
                await self._send_json(ws, transcript("final_transcript", utt))
            await self._send_json(ws, {"type": "session.finalized", "session_id": session_id})

        self._spawn(conn, self._idle_watchdog(conn, idle))
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.CLOSE:
                self._event(conn.kind, f"client_close_frame#{conn.id}")
                await self._ack_close(conn, ws)
                return
            if msg.type == WSMsgType.BINARY:
                continue
            if msg.type != WSMsgType.TEXT:
                return
            try:
                data = json.loads(msg.data)
                msg_type = data.get("type")
            except (ValueError, AttributeError):
                continue
            if msg_type == "input_audio":
                conn.last_audio = time.monotonic()
                try:
                    pcm = base64.b64decode(data.get("audio", ""))
                except (ValueError, TypeError):
                    continue
                started, due = detector.feed(
                    pcm,
                    rms_threshold=self.speech_rms_threshold,
                    min_speech=self.speech_min_seconds,
                    text=self.transcript_text,
                )
                if started is not None:
                    self._event(conn.kind, f"start_of_speech#{conn.id}")
                    await self._send_json(ws, {"type": "start_of_speech", "session_id": session_id})
                if due is not None:
                    self._event(conn.kind, f"final#{conn.id}")
                    await self._send_json(ws, transcript("interim_transcript", due))
                    await self._send_json(ws, transcript("final_transcript", due))
            elif msg_type == "session.create":
                settings = data.get("settings") or {}
                with contextlib.suppress(TypeError, ValueError):
                    sample_rate = int(settings.get("sample_rate", sample_rate))
                language = str(settings.get("language") or language)
                detector = SpeechDetector(sample_rate=sample_rate)
                self._event(conn.kind, f"session.create#{conn.id}")
                await self._send_json(ws, {"type": "session.created", "session_id": session_id})
            elif msg_type == "session.finalize":
                self._event(conn.kind, f"session.finalize#{conn.id}")
                self._spawn(conn, finalize())
            elif msg_type == "session.update":
                self._event(conn.kind, f"session.update#{conn.id}")
            elif msg_type == "session.close":
                conn.clean = True
                self._event(conn.kind, f"session.close#{conn.id}")
                if self.slow_close > 0:
                    self._event(conn.kind, f"slow_close#{conn.id}:{self.slow_close:g}s")
                    await asyncio.sleep(self.slow_close)
                await self._send_json(ws, {"type": "session.closed", "session_id": session_id})
                await ws.close()
                return

    # ------------------------------------------------------------------ inference TTS

    async def _handle_inference_tts(self, request: web.Request) -> web.StreamResponse:
        conn = self._admit("inference_tts", request)
        try:
            res = await self._open_inference_ws(conn, request)
            if not isinstance(res, web.WebSocketResponse):
                return res
            if self._stall_for(conn.kind) == "never_answer":
                await self._never_answer(conn, res)
                return res
            await self._inference_tts_session(conn, res)
            return res
        finally:
            self._release(conn)

    async def _inference_tts_session(self, conn: _Conn, ws: web.WebSocketResponse[bool]) -> None:
        session_id = f"standin_tts_{conn.id}"
        sample_rate = 24000
        text: list[str] = []
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.CLOSE:
                conn.clean = True  # pooled TTS sockets end with a bare close frame
                self._event(conn.kind, f"client_close_frame#{conn.id}")
                await self._ack_close(conn, ws)
                return
            if msg.type == WSMsgType.BINARY:
                continue
            if msg.type != WSMsgType.TEXT:
                return
            try:
                data = json.loads(msg.data)
                msg_type = data.get("type")
            except (ValueError, AttributeError):
                continue
            if msg_type == "session.create":
                with contextlib.suppress(TypeError, ValueError):
                    sample_rate = int(data.get("sample_rate", sample_rate))
                self._event(conn.kind, f"session.create#{conn.id}")
                await self._send_json(ws, {"type": "session.created", "session_id": session_id})
            elif msg_type == "input_transcript":
                text.append(str(data.get("transcript", "")))
            elif msg_type == "session.flush":
                words = len("".join(text).split())
                text.clear()
                seconds = words * self.tts_ms_per_word / 1000.0
                self._event(conn.kind, f"synthesize#{conn.id}:{words}w")
                pcm = tone_pcm16(seconds, sample_rate=sample_rate, freq=220.0, amplitude=0.1)
                step = max(2, (sample_rate // 10) * 2)  # 100 ms per message
                for off in range(0, len(pcm), step):
                    chunk = base64.b64encode(pcm[off : off + step]).decode()
                    await self._send_json(
                        ws, {"type": "output_audio", "audio": chunk, "session_id": session_id}
                    )
                await self._send_json(ws, {"type": "done", "session_id": session_id})
            elif msg_type == "session.close":
                conn.clean = True
                self._event(conn.kind, f"session.close#{conn.id}")
                if self.slow_close > 0:
                    await asyncio.sleep(self.slow_close)
                await ws.close()
                return

    # ------------------------------------------------------------------ Deepgram STT

    async def _handle_deepgram(self, request: web.Request) -> web.StreamResponse:
        conn = self._admit("deepgram_stt", request)
        try:
            if request.headers.get("Authorization", "") != f"Token {self.provider_api_key}":
                self._event(conn.kind, f"unauthorized#{conn.id}")
                return web.json_response({"err_code": "INVALID_AUTH"}, status=401)
            res = await self._open_ws(conn, request)
            if not isinstance(res, web.WebSocketResponse):
                return res
            ws = res
            if conn.server_closed:  # quota, error_frame mode
                await self._send_json(
                    ws,
                    {
                        "type": "Error",
                        "err_code": "TOO_MANY_REQUESTS",
                        "err_msg": QUOTA_ERROR_MESSAGE,
                    },
                )
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"TOO_MANY_REQUESTS")
                return ws
            if self._stall_for(conn.kind) == "never_answer":
                await self._never_answer(conn, ws)
                return ws
            await self._deepgram_session(conn, ws, request)
            return ws
        finally:
            self._release(conn)

    async def _deepgram_session(
        self, conn: _Conn, ws: web.WebSocketResponse[bool], request: web.Request
    ) -> None:
        q = request.query

        def flag(name: str, default: bool) -> bool:
            value = q.get(name)
            return default if value is None else value.lower() == "true"

        sample_rate = int(q.get("sample_rate", "16000") or 16000)
        channels = int(q.get("channels", "1") or 1)
        interim = flag("interim_results", True)
        vad_events = flag("vad_events", False)
        request_id = f"standin-dg-{conn.id}"
        detector = SpeechDetector(sample_rate=sample_rate, num_channels=channels)

        def results(utt: Utterance, *, final: bool, from_finalize: bool = False) -> dict[str, Any]:
            return {
                "type": "Results",
                "channel_index": [0, channels],
                "duration": utt.duration,
                "start": utt.start,
                "is_final": final,
                "speech_final": final,
                "from_finalize": from_finalize,
                "channel": {
                    "alternatives": [
                        {
                            "transcript": utt.text,
                            "confidence": 0.99,
                            "words": [
                                {
                                    "word": w.lower().strip(".,!?"),
                                    "start": s,
                                    "end": e,
                                    "confidence": 0.99,
                                    "punctuated_word": w,
                                }
                                for w, s, e in utt.words()
                            ],
                        }
                    ]
                },
                "metadata": {
                    "request_id": request_id,
                    "model_info": {"name": "standin", "version": "0", "arch": "standin"},
                    "model_uuid": "00000000-0000-0000-0000-000000000000",
                },
            }

        async def flush_final(*, from_finalize: bool) -> None:
            pending = detector.has_pending
            utt = detector.finalize(text=self.transcript_text)
            if utt is None:
                return
            if not pending and vad_events:
                await self._send_json(ws, {"type": "SpeechStarted", "channel": [0], "timestamp": utt.start})
            self._event(conn.kind, f"final#{conn.id}:flush")
            await self._send_json(ws, results(utt, final=True, from_finalize=from_finalize))

        async def finalize() -> None:
            if self.finalize_delay > 0:
                await asyncio.sleep(self.finalize_delay)
            await flush_final(from_finalize=True)

        finalizers: list[asyncio.Task[None]] = []

        async def idle() -> None:
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=DEEPGRAM_IDLE_REASON.encode())

        self._spawn(conn, self._idle_watchdog(conn, idle))
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.CLOSE:
                self._event(conn.kind, f"client_close_frame#{conn.id}")
                await self._ack_close(conn, ws)
                return
            if msg.type == WSMsgType.BINARY:
                conn.last_audio = time.monotonic()
                started, due = detector.feed(
                    bytes(msg.data),
                    rms_threshold=self.speech_rms_threshold,
                    min_speech=self.speech_min_seconds,
                    text=self.transcript_text,
                )
                if started is not None and vad_events:
                    self._event(conn.kind, f"start_of_speech#{conn.id}")
                    await self._send_json(ws, {"type": "SpeechStarted", "channel": [0], "timestamp": started})
                if due is not None:
                    self._event(conn.kind, f"final#{conn.id}")
                    if interim:
                        await self._send_json(ws, results(due, final=False))
                    await self._send_json(ws, results(due, final=True))
                continue
            if msg.type != WSMsgType.TEXT:
                return
            try:
                msg_type = json.loads(msg.data).get("type")
            except (ValueError, AttributeError):
                continue
            if msg_type == "KeepAlive":
                continue
            if msg_type == "Finalize":
                self._event(conn.kind, f"Finalize#{conn.id}")
                finalizers.append(self._spawn(conn, finalize()))
            elif msg_type == "CloseStream":
                conn.clean = True
                self._event(conn.kind, f"CloseStream#{conn.id}")
                # like Deepgram: answer outstanding Finalize requests and transcribe the
                # remaining audio (finalize_delay models that work) before Metadata
                if finalizers:
                    await asyncio.wait(finalizers)
                if detector.has_pending and self.finalize_delay > 0:
                    await asyncio.sleep(self.finalize_delay)
                await flush_final(from_finalize=False)
                if self.slow_close > 0:
                    self._event(conn.kind, f"slow_close#{conn.id}:{self.slow_close:g}s")
                    await asyncio.sleep(self.slow_close)
                await self._send_json(
                    ws,
                    {
                        "type": "Metadata",
                        "transaction_key": "deprecated",
                        "request_id": request_id,
                        "sha256": "",
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "duration": detector.audio_seconds,
                        "channels": channels,
                    },
                )
                await ws.close()
                return

    # ------------------------------------------------------------------ OpenAI-compatible LLM

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "standin", "object": "model", "created": 0, "owned_by": "standin"}],
            }
        )

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        conn = self._admit("llm", request)
        try:
            header = request.headers.get("Authorization", "")
            client: Literal["inference", "openai"]
            if header == f"Bearer {self.provider_api_key}":
                client = "openai"
            elif self._authorized_inference(request):
                client = "inference"
            else:
                self._event(conn.kind, f"unauthorized#{conn.id}")
                return web.json_response(
                    {"error": {"message": "invalid api key", "type": "auth", "code": "401"}},
                    status=401,
                )
            self._mark_open(conn)
            stall = self._stall_for(conn.kind)
            if stall == "no_handshake":
                self._event(conn.kind, f"stall:no_handshake#{conn.id}")
                await self._hold(request)
                return web.Response(status=503, text="stalled")
            body = await request.json()
            messages = list(body.get("messages") or [])
            tools = [
                str(t.get("function", {}).get("name", ""))
                for t in (body.get("tools") or [])
                if isinstance(t, dict)
            ]
            model = str(body.get("model", "standin"))
            with self._lock:
                self._llm_requests.append(
                    LLMRequest(messages=messages, tools=tools, model=model, client=client, body=body)
                )
            self._event(conn.kind, f"chat#{conn.id}:{client}")
            completion_id = f"chatcmpl-standin-{conn.id}"
            created = int(time.time())
            call_prefix = f"call_standin_{conn.id}"
            if stall == "never_answer":
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                self._event(conn.kind, f"stall:never_answer#{conn.id}")
                await self._hold(request)
                return resp
            reply = self._next_reply()
            if self.llm_first_token_delay > 0:
                await asyncio.sleep(self.llm_first_token_delay)
            if not body.get("stream"):
                conn.clean = True
                return web.json_response(
                    completion_body(
                        reply,
                        completion_id=completion_id,
                        model=model,
                        created=created,
                        call_prefix=call_prefix,
                    )
                )
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            try:
                for chunk in reply_chunks(
                    reply,
                    completion_id=completion_id,
                    model=model,
                    created=created,
                    call_prefix=call_prefix,
                ):
                    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                self._event(conn.kind, f"client_gone#{conn.id}")
                return resp
            conn.clean = True
            return resp
        finally:
            self._release(conn)
