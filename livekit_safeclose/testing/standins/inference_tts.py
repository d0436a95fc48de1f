"""Stand-in for LiveKit Inference TTS: `livekit.agents.inference.TTS` over JSON frames.

    ws {inference_url}/tts?model=...

Text accumulates from `input_transcript` until `session.flush`, which is answered
with a quiet 220 Hz tone, `tts_ms_per_word` per word, in 100 ms `output_audio`
messages, then `done`. The plugin pools these sockets and retires them with a
bare close frame, so here a client close frame counts as a clean goodbye.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from ._inference_auth import InferenceWsProtocol
from ._types import Route
from .audio import tone_pcm16

if TYPE_CHECKING:
    from ._ledger import Conn
    from ._ws import Websocket
    from .server import ProviderServer

__all__ = ["ROUTES", "InferenceTTS"]


class InferenceTTS(InferenceWsProtocol):
    kind = "inference_tts"
    goodbye_messages = frozenset({"session.close"})
    close_frame_is_goodbye = True  # pooled TTS sockets end with a bare close frame

    def __init__(self, server: ProviderServer, conn: Conn, ws: Websocket, request: web.Request) -> None:
        super().__init__(server, conn, ws, request)
        self.session_id = f"standin_tts_{conn.id}"
        self.sample_rate = 24000
        self.text: list[str] = []

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool:
        if msg_type == "session.create":
            with contextlib.suppress(TypeError, ValueError):
                self.sample_rate = int(data.get("sample_rate", self.sample_rate))
            self.conn.log("session.create")
            await self.send({"type": "session.created", "session_id": self.session_id})
        elif msg_type == "input_transcript":
            self.text.append(str(data.get("transcript", "")))
        elif msg_type == "session.flush":
            await self._synthesize()
        elif msg_type == "session.close":
            self.said_goodbye("session.close")
            if self.server.slow_close > 0:
                await asyncio.sleep(self.server.slow_close)
            await self.ws.close()
            return True
        return False

    async def _synthesize(self) -> None:
        words = len("".join(self.text).split())
        self.text.clear()
        seconds = words * self.server.tts_ms_per_word / 1000.0
        self.conn.log("synthesize", f"{words}w")
        pcm = tone_pcm16(seconds, sample_rate=self.sample_rate, freq=220.0, amplitude=0.1)
        step = max(2, (self.sample_rate // 10) * 2)  # 100 ms per message
        for off in range(0, len(pcm), step):
            chunk = base64.b64encode(pcm[off : off + step]).decode()
            await self.send({"type": "output_audio", "audio": chunk, "session_id": self.session_id})
        await self.send({"type": "done", "session_id": self.session_id})


ROUTES: Final = (Route("GET", "/v1/tts", InferenceTTS.handle),)
