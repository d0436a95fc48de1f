"""Stand-in for LiveKit Inference STT: `livekit.agents.inference.STT` over JSON frames.

    ws {inference_url}/stt?model=...

Audio arrives base64 in `input_audio`; transcripts of `transcript_text` are sent
when the energy detector says an utterance is due. The goodbye is `session.close`,
answered with `session.closed`. An idle connection gets error 2007 then a close,
which is what the real service does to a stream that stopped sending audio.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from ._inference_auth import InferenceWsProtocol
from ._speech import SpeechDetector, Utterance
from ._types import Route
from ._ws import QUOTA_ERROR_CODE, QUOTA_ERROR_MESSAGE, send_json, slow_close_pause

if TYPE_CHECKING:
    from ._ledger import Conn
    from ._ws import Websocket
    from .server import ProviderServer

__all__ = ["IDLE_CLOSE_CODE", "IDLE_CLOSE_MESSAGE", "ROUTES", "InferenceSTT"]

IDLE_CLOSE_CODE: Final = 2007
IDLE_CLOSE_MESSAGE: Final = "session closed due to agent inactivity"


class InferenceSTT(InferenceWsProtocol):
    kind = "inference_stt"
    goodbye_messages = frozenset({"session.close"})

    def __init__(self, server: ProviderServer, conn: Conn, ws: Websocket, request: web.Request) -> None:
        super().__init__(server, conn, ws, request)
        self.session_id = f"standin_stt_{conn.id}"
        self.sample_rate = 16000
        self.language = "en"
        self.detector = SpeechDetector(sample_rate=self.sample_rate)

    @classmethod
    async def refuse_over_quota(cls, ws: Websocket) -> None:
        await send_json(ws, {"type": "error", "code": QUOTA_ERROR_CODE, "message": QUOTA_ERROR_MESSAGE})
        await ws.close()

    async def serve(self) -> None:
        self.watch_idle(self._idle_close)
        await super().serve()

    async def _idle_close(self) -> None:
        await self.send({"type": "error", "code": IDLE_CLOSE_CODE, "message": IDLE_CLOSE_MESSAGE})
        await self.ws.close()

    def _transcript(self, kind: str, utt: Utterance) -> dict[str, Any]:
        return {
            "type": kind,
            "session_id": self.session_id,
            "request_id": self.session_id,
            "transcript": utt.text,
            "language": self.language,
            "start": utt.start,
            "duration": utt.duration,
            "confidence": 0.99,
            "words": [{"word": w, "start": s, "end": e, "confidence": 0.99} for w, s, e in utt.words()],
        }

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool:
        if msg_type == "input_audio":
            await self._input_audio(data)
        elif msg_type == "session.create":
            await self._session_create(data)
        elif msg_type == "session.finalize":
            self.conn.log("session.finalize")
            self.conn.spawn(self._finalize())
        elif msg_type == "session.update":
            self.conn.log("session.update")
        elif msg_type == "session.close":
            self.said_goodbye("session.close")
            await slow_close_pause(self.server, self.conn)
            await self.send({"type": "session.closed", "session_id": self.session_id})
            await self.ws.close()
            return True
        return False

    async def _input_audio(self, data: dict[str, Any]) -> None:
        self.conn.last_audio = time.monotonic()
        try:
            pcm = base64.b64decode(data.get("audio", ""))
        except (ValueError, TypeError):
            return
        started, due = self.detector.feed(
            pcm,
            rms_threshold=self.server.speech_rms_threshold,
            min_speech=self.server.speech_min_seconds,
            text=self.server.transcript_text,
        )
        if started is not None:
            self.conn.log("start_of_speech")
            await self.send({"type": "start_of_speech", "session_id": self.session_id})
        if due is not None:
            self.conn.log("final")
            await self.send(self._transcript("interim_transcript", due))
            await self.send(self._transcript("final_transcript", due))

    async def _session_create(self, data: dict[str, Any]) -> None:
        settings = data.get("settings") or {}
        with contextlib.suppress(TypeError, ValueError):
            self.sample_rate = int(settings.get("sample_rate", self.sample_rate))
        self.language = str(settings.get("language") or self.language)
        self.detector = SpeechDetector(sample_rate=self.sample_rate)
        self.conn.log("session.create")
        await self.send({"type": "session.created", "session_id": self.session_id})

    async def _finalize(self) -> None:
        """Flush pending speech as a final transcript, `finalize_delay` late."""
        if self.server.finalize_delay > 0:
            await asyncio.sleep(self.server.finalize_delay)
        pending = self.detector.has_pending
        utt = self.detector.finalize(text=self.server.transcript_text)
        if utt is not None:
            if not pending:
                await self.send({"type": "start_of_speech", "session_id": self.session_id})
            self.conn.log("final", "finalize")
            await self.send(self._transcript("final_transcript", utt))
        await self.send({"type": "session.finalized", "session_id": self.session_id})


ROUTES: Final = (Route("GET", "/v1/stt", InferenceSTT.handle),)
