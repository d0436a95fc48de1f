"""Stand-in provider servers: the real LiveKit plugins, real sockets, fake providers.

See `ProviderServer` for the protocols served, the counters and the fault switches.

Layout, one concern per module:

    server.py         ProviderServer: thread + event loop, switches, URLs, routes table
    _ledger.py        per-kind counters, event log, live connections (thread-safe)
    _ws.py            what every websocket protocol shares: the upgrade gate (stalls,
                      quota), the one receive loop, close acks, idle watchdog
    _inference_auth.py  LiveKit Inference's signed-token check
    inference_stt.py  ws /v1/stt      livekit.agents.inference.STT
    inference_tts.py  ws /v1/tts      livekit.agents.inference.TTS
    deepgram.py       ws /v1/listen   livekit.plugins.deepgram.STT
    openai_chat.py    POST /v1/chat/completions, GET /v1/models (SSE chat completions)
    _llm.py, _speech.py, audio.py   wire format, utterance detection, PCM helpers
    providers.py      the old single-module import path, re-exported

Adding a protocol (say an OpenAI Realtime websocket, or an MCP server):

1. name its counters: add the kind to `Kind` and `KINDS` in `_types.py`;
2. write one module. A websocket protocol subclasses `_ws.WsProtocol`, sets `kind`,
   `goodbye_messages` (and `close_frame_is_goodbye` if a bare close frame is the
   goodbye), overrides `on_message` / `on_binary` and, if it needs them,
   `refuse_unauthorized` / `refuse_over_quota`; stalls, quota, close acks and
   clean-close accounting then come for free. An HTTP protocol writes
   `async def handler(server, request)` and wraps it in `server._ledger.track(...)`.
   Either way the module exposes `ROUTES = (Route(method, path, handler), ...)`;
3. append that module's `ROUTES` to `server.ROUTES`.
"""

from ._ledger import LogEntry
from ._llm import LLMReply, LLMRequest
from ._types import KINDS, STT_KINDS, InferenceCredentials, Kind, QuotaMode, StallMode
from .audio import pcm16_rms, silence_frames, silence_pcm16, tone_frames, tone_pcm16
from .inference_stt import IDLE_CLOSE_CODE, IDLE_CLOSE_MESSAGE
from .server import ProviderServer

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
    "pcm16_rms",
    "silence_frames",
    "silence_pcm16",
    "tone_frames",
    "tone_pcm16",
]
