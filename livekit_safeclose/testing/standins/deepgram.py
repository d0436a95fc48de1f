"""Stand-in for Deepgram live transcription: `livekit.plugins.deepgram.STT`.

    ws {deepgram_url}?sample_rate=...&channels=...&interim_results=...&vad_events=...

Audio arrives as binary PCM, control messages as JSON. Like Deepgram, `CloseStream`
is answered only after outstanding `Finalize` requests and the remaining audio are
transcribed, then a `Metadata` message and a close; that drain is what a client's
close waits for. An idle connection gets Deepgram's 1011 close with its NET-0001
reason, a quota refusal an `Error` message and a 1008 close.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import WSCloseCode, web

from ._speech import SpeechDetector, Utterance
from ._types import Route
from ._ws import QUOTA_ERROR_MESSAGE, WsProtocol, send_json, slow_close_pause

if TYPE_CHECKING:
    from ._ledger import Conn
    from ._ws import Websocket
    from .server import ProviderServer

__all__ = ["DEEPGRAM_IDLE_REASON", "ROUTES", "DeepgramSTT"]

DEEPGRAM_IDLE_REASON: Final = (
    "Deepgram did not receive audio data or a text message within the timeout window."
)


def _results_message(
    utt: Utterance, *, final: bool, from_finalize: bool, channels: int, request_id: str
) -> dict[str, Any]:
    words = [
        {"word": w.lower().strip(".,!?"), "start": s, "end": e, "confidence": 0.99, "punctuated_word": w}
        for w, s, e in utt.words()
    ]
    return {
        "type": "Results",
        "channel_index": [0, channels],
        "duration": utt.duration,
        "start": utt.start,
        "is_final": final,
        "speech_final": final,
        "from_finalize": from_finalize,
        "channel": {"alternatives": [{"transcript": utt.text, "confidence": 0.99, "words": words}]},
        "metadata": {
            "request_id": request_id,
            "model_info": {"name": "standin", "version": "0", "arch": "standin"},
            "model_uuid": "00000000-0000-0000-0000-000000000000",
        },
    }


class DeepgramSTT(WsProtocol):
    kind = "deepgram_stt"
    goodbye_messages = frozenset({"CloseStream"})

    def __init__(self, server: ProviderServer, conn: Conn, ws: Websocket, request: web.Request) -> None:
        super().__init__(server, conn, ws, request)
        q = request.query

        def flag(name: str, default: bool) -> bool:
            value = q.get(name)
            return default if value is None else value.lower() == "true"

        self.sample_rate = int(q.get("sample_rate", "16000") or 16000)
        self.channels = int(q.get("channels", "1") or 1)
        self.interim = flag("interim_results", True)
        self.vad_events = flag("vad_events", False)
        self.request_id = f"standin-dg-{conn.id}"
        self.detector = SpeechDetector(sample_rate=self.sample_rate, num_channels=self.channels)
        self.finalizers: list[asyncio.Task[None]] = []

    @classmethod
    def refuse_unauthorized(cls, server: ProviderServer, request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Authorization", "") == f"Token {server.provider_api_key}":
            return None
        return web.json_response({"err_code": "INVALID_AUTH"}, status=401)

    @classmethod
    async def refuse_over_quota(cls, ws: Websocket) -> None:
        await send_json(
            ws, {"type": "Error", "err_code": "TOO_MANY_REQUESTS", "err_msg": QUOTA_ERROR_MESSAGE}
        )
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"TOO_MANY_REQUESTS")

    async def serve(self) -> None:
        self.watch_idle(self._idle_close)
        await super().serve()

    async def _idle_close(self) -> None:
        await self.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=DEEPGRAM_IDLE_REASON.encode())

    def _results(self, utt: Utterance, *, final: bool, from_finalize: bool = False) -> dict[str, Any]:
        return _results_message(
            utt, final=final, from_finalize=from_finalize, channels=self.channels, request_id=self.request_id
        )

    async def _speech_started(self, timestamp: float) -> None:
        await self.send({"type": "SpeechStarted", "channel": [0], "timestamp": timestamp})

    async def on_binary(self, data: bytes) -> None:
        self.conn.last_audio = time.monotonic()
        started, due = self.detector.feed(
            data,
            rms_threshold=self.server.speech_rms_threshold,
            min_speech=self.server.speech_min_seconds,
            text=self.server.transcript_text,
        )
        if started is not None and self.vad_events:
            self.conn.log("start_of_speech")
            await self._speech_started(started)
        if due is not None:
            self.conn.log("final")
            if self.interim:
                await self.send(self._results(due, final=False))
            await self.send(self._results(due, final=True))

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool:
        if msg_type == "Finalize":
            self.conn.log("Finalize")
            self.finalizers.append(self.conn.spawn(self._finalize()))
        elif msg_type == "CloseStream":
            await self._close_stream()
            return True
        return False  # KeepAlive and anything unknown: nothing to answer

    async def _flush_final(self, *, from_finalize: bool) -> None:
        pending = self.detector.has_pending
        utt = self.detector.finalize(text=self.server.transcript_text)
        if utt is None:
            return
        if not pending and self.vad_events:
            await self._speech_started(utt.start)
        self.conn.log("final", "flush")
        await self.send(self._results(utt, final=True, from_finalize=from_finalize))

    async def _finalize(self) -> None:
        if self.server.finalize_delay > 0:
            await asyncio.sleep(self.server.finalize_delay)
        await self._flush_final(from_finalize=True)

    async def _close_stream(self) -> None:
        """Drain like Deepgram: answer outstanding Finalize requests and transcribe the
        remaining audio (finalize_delay models that work), then Metadata and close."""
        self.said_goodbye("CloseStream")
        if self.finalizers:
            await asyncio.wait(self.finalizers)
        if self.detector.has_pending and self.server.finalize_delay > 0:
            await asyncio.sleep(self.server.finalize_delay)
        await self._flush_final(from_finalize=False)
        await slow_close_pause(self.server, self.conn)
        await self.send(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id,
                "sha256": "",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "duration": self.detector.audio_seconds,
                "channels": self.channels,
            }
        )
        await self.ws.close()


ROUTES: Final = (Route("GET", "/v1/listen", DeepgramSTT.handle),)
