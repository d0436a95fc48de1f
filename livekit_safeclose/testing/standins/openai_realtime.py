"""Stand-in for the OpenAI Realtime API: `livekit.plugins.openai.realtime.RealtimeModel`.

    ws {openai_realtime_url}/realtime?model=...   Authorization: Bearer <provider key>

Checked against the client in `livekit/agents/llm/_realtime/openai.py` (1.8.9): it
sends `session.update` first, then `input_audio_buffer.append` (base64 PCM16, 24 kHz
mono), `conversation.item.create` / `.delete` (a chat-context update waits up to 5 s for
`conversation.item.added` / `.deleted` per item), `response.create` (its
`response.metadata.client_event_id` must come back in `response.created`, or
`generate_reply()` times out), `response.cancel`, and ends with a bare close frame (its
goodbye). What a reply looks like to it:

    response.created -> response.output_item.added -> conversation.item.added
    -> [message: response.content_part.added, response.output_audio_transcript.delta,
        response.output_audio.delta, response.output_audio.done, response.output_item.done]
    -> [function call: response.function_call_arguments.done, response.output_item.done
        (the client runs the tool on this one)]
    -> response.done

Replies come from `ProviderServer.realtime_script` (`LLMReply`: text, then tool calls).
Server-side turn detection is modelled on the audio energy (the same `SpeechDetector`
as the STT stand-ins): voice then silence is a user turn, answered with a response when
the session's turn detection says `create_response`. `realtime_item_delay` holds the
confirmation of every `function_call_output` item (a tool result), so a close can be made
to land while a chat-context update is in flight; `realtime_refusal` answers the upgrade
with an in-band `error` of that code and closes (`insufficient_quota` is fatal to the
client: it stops reconnecting).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from ._llm import LLMReply
from ._speech import SpeechDetector
from ._types import Route
from ._ws import WsProtocol
from .audio import pcm16_rms, tone_pcm16

if TYPE_CHECKING:
    from ._ledger import Conn
    from ._ws import Websocket
    from .server import ProviderServer

__all__ = ["ROUTES", "OpenAIRealtime"]

SAMPLE_RATE: Final = 24000
#: client events worth a line in the server's log (audio appends would flood it)
_LOGGED: Final = frozenset(
    {
        "session.update",
        "conversation.item.create",
        "conversation.item.delete",
        "conversation.item.truncate",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "response.create",
        "response.cancel",
    }
)


class OpenAIRealtime(WsProtocol):
    kind = "openai_realtime"
    close_frame_is_goodbye = True  # the client's goodbye is its close frame

    def __init__(self, server: ProviderServer, conn: Conn, ws: Websocket, request: web.Request) -> None:
        super().__init__(server, conn, ws, request)
        self.model = request.query.get("model", "gpt-realtime")
        self.session: dict[str, Any] = {
            "type": "realtime",
            "model": self.model,
            "output_modalities": ["audio"],
        }
        self.items: list[str] = []  # the conversation, by item id
        self.detector = SpeechDetector(sample_rate=SAMPLE_RATE)
        self.speaking_item: str | None = None
        self.heard_turn = False
        self.response: asyncio.Task[None] | None = None
        self.cancelled = False
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()

    @classmethod
    def refuse_unauthorized(cls, server: ProviderServer, request: web.Request) -> web.StreamResponse | None:
        if request.headers.get("Authorization", "") == f"Bearer {server.provider_api_key}":
            return None
        return web.json_response(
            {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                       "code": "invalid_api_key"}},
            status=401,
        )  # fmt: skip

    def _id(self, prefix: str) -> str:
        return f"{prefix}_standin_{self.conn.id}_{next(self._ids)}"

    async def emit(self, event_type: str, **fields: Any) -> bool:
        """Send one server event (serialised: a reply and an item answer never interleave)."""
        async with self._send_lock:
            return await self.send({"type": event_type, "event_id": self._id("event"), **fields})

    async def serve(self) -> None:
        if (code := self.server.realtime_refusal) is not None:
            self.conn.server_closed = True
            self.conn.log("refused", code)
            await self.emit("error", error={"type": "invalid_request_error", "code": code,
                                            "message": f"refused by the stand-in: {code}"})  # fmt: skip
            await self.ws.close()
            return
        await self.emit(
            "session.created", session={**self.session, "id": self._id("sess"), "object": "realtime.session"}
        )
        await super().serve()

    # ------------------------------------------------------------------ client events

    async def on_message(self, msg_type: object, data: dict[str, Any]) -> bool:
        if msg_type in _LOGGED:
            self.conn.log(str(msg_type))
        if msg_type == "input_audio_buffer.append":
            await self._audio(base64.b64decode(str(data.get("audio", ""))))
        elif msg_type == "session.update":
            self._merge_session(data.get("session") or {})
            await self.emit("session.updated", session=self.session)
        elif msg_type == "conversation.item.create":
            await self._create_item(data)
        elif msg_type == "conversation.item.delete":
            item_id = str(data.get("item_id", ""))
            if item_id in self.items:
                self.items.remove(item_id)
            await self.emit("conversation.item.deleted", item_id=item_id)
        elif msg_type == "conversation.item.truncate":
            await self.emit("conversation.item.truncated", item_id=data.get("item_id"),
                            content_index=data.get("content_index", 0), audio_end_ms=data.get("audio_end_ms", 0))  # fmt: skip
        elif msg_type == "input_audio_buffer.commit":
            await self._commit_turn()
        elif msg_type == "input_audio_buffer.clear":
            self.detector.finalize(text="")
            await self.emit("input_audio_buffer.cleared")
        elif msg_type == "response.create":
            self._start_response((data.get("response") or {}).get("metadata"))
        elif msg_type == "response.cancel":
            self.cancelled = True
        return False

    def _merge_session(self, update: dict[str, Any]) -> None:
        for key, value in update.items():
            if key == "audio" and isinstance(value, dict):
                audio = self.session.setdefault("audio", {})
                for side, cfg in value.items():
                    if isinstance(cfg, dict):
                        audio.setdefault(side, {}).update(cfg)
            else:
                self.session[key] = value

    async def _create_item(self, data: dict[str, Any]) -> None:
        item = dict(data.get("item") or {})
        item.setdefault("id", self._id("item"))
        previous = data.get("previous_item_id")
        previous = None if previous in (None, "root") else previous
        delay = self.server.realtime_item_delay if item.get("type") == "function_call_output" else 0.0
        if delay > 0:
            self.conn.log("item_delay", f"{delay:g}s")
            self.conn.spawn(self._confirm_item(item, previous, delay))
        else:
            await self._confirm_item(item, previous, 0.0)

    async def _confirm_item(self, item: dict[str, Any], previous: str | None, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        self._insert(str(item["id"]), previous)
        await self.emit("conversation.item.added", previous_item_id=previous,
                        item={**item, "object": "realtime.item", "status": "completed"})  # fmt: skip
        await self.emit("conversation.item.done", previous_item_id=previous, item=item)

    def _insert(self, item_id: str, previous: str | None) -> None:
        if item_id in self.items:
            self.items.remove(item_id)
        at = self.items.index(previous) + 1 if previous in self.items else len(self.items)
        self.items.insert(at, item_id)

    # ------------------------------------------------------------------ server-side turns

    def _turn_detection(self) -> dict[str, Any] | None:
        td = ((self.session.get("audio") or {}).get("input") or {}).get("turn_detection")
        return td if isinstance(td, dict) else None

    async def _audio(self, pcm: bytes) -> None:
        self.conn.last_audio = time.monotonic()
        started, due = self.detector.feed(
            pcm,
            rms_threshold=self.server.speech_rms_threshold,
            min_speech=self.server.speech_min_seconds,
            text=self.server.transcript_text,
        )
        if self._turn_detection() is None:
            return  # the client commits the turn itself
        if started is not None:
            self.speaking_item = self._id("item")
            self.conn.log("speech_started")
            await self.emit("input_audio_buffer.speech_started", audio_start_ms=int(started * 1000),
                            item_id=self.speaking_item)  # fmt: skip
        if due is not None:
            self.heard_turn = True
        elif self.heard_turn and pcm16_rms(pcm) < self.server.speech_rms_threshold:
            # the first unvoiced chunk after a full utterance ends the turn
            self.heard_turn = False
            await self.emit("input_audio_buffer.speech_stopped", audio_end_ms=int(self.detector.audio_seconds * 1000),
                            item_id=self.speaking_item)  # fmt: skip
            await self._commit_turn()
            td = self._turn_detection() or {}
            if td.get("create_response", True):
                self._start_response(None)

    async def _commit_turn(self) -> None:
        """The user's turn becomes a conversation item, with its transcript."""
        item_id = self.speaking_item or self._id("item")
        self.speaking_item = None
        previous = self.items[-1] if self.items else None
        self._insert(item_id, previous)
        await self.emit("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        text = self.server.transcript_text
        item = {"id": item_id, "type": "message", "role": "user", "object": "realtime.item", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}  # fmt: skip
        await self.emit("conversation.item.added", previous_item_id=previous, item=item)
        if self.session.get("audio", {}).get("input", {}).get("transcription"):
            await self.emit("conversation.item.input_audio_transcription.completed", item_id=item_id,
                            content_index=0, transcript=text)  # fmt: skip

    # ------------------------------------------------------------------ responses

    def _start_response(self, metadata: object) -> None:
        if self.response is not None and not self.response.done():
            self.conn.spawn(self._busy())
            return
        self.cancelled = False
        self.response = self.conn.spawn(self._respond(self.server._next_realtime_reply(), metadata))

    async def _busy(self) -> None:
        await self.emit("error", error={
            "type": "invalid_request_error", "code": "conversation_already_has_active_response",
            "message": "Conversation already has an active response in progress"})  # fmt: skip

    async def _respond(self, reply: LLMReply, metadata: object) -> None:
        response_id = self._id("resp")
        self.conn.log("response", f"{len(reply.tool_calls)}tools" if reply.tool_calls else "text")
        head = {"id": response_id, "object": "realtime.response", "metadata": metadata}
        await self.emit("response.created", response={**head, "status": "in_progress", "output": []})
        output: list[dict[str, Any]] = []
        if reply.text:
            output.append(await self._message(response_id, len(output), reply.text))
        for name, arguments in reply.tool_calls:
            if self.cancelled:
                break
            output.append(await self._function_call(response_id, len(output), name, arguments))
        status = "cancelled" if self.cancelled else "completed"
        usage = {"total_tokens": 20, "input_tokens": 10, "output_tokens": 10}
        await self.emit(
            "response.done", response={**head, "status": status, "output": output, "usage": usage}
        )

    async def _added(self, response_id: str, index: int, item: dict[str, Any]) -> None:
        previous = self.items[-1] if self.items else None
        self._insert(str(item["id"]), previous)
        await self.emit("response.output_item.added", response_id=response_id, output_index=index, item=item)
        await self.emit("conversation.item.added", previous_item_id=previous, item=item)

    async def _message(self, response_id: str, index: int, text: str) -> dict[str, Any]:
        audio_out = "audio" in (self.session.get("output_modalities") or ["audio"])
        item_id = self._id("item")
        item: dict[str, Any] = {"id": item_id, "type": "message", "role": "assistant", "object": "realtime.item",
                                "status": "in_progress", "content": []}  # fmt: skip
        await self._added(response_id, index, item)
        where = {"response_id": response_id, "item_id": item_id, "output_index": index, "content_index": 0}
        part = {"type": "audio", "transcript": ""} if audio_out else {"type": "text", "text": ""}
        await self.emit("response.content_part.added", **where, part=part)
        if audio_out:
            await self.emit("response.output_audio_transcript.delta", **where, delta=text)
            seconds = self.server.realtime_audio_seconds
            pcm = tone_pcm16(seconds, sample_rate=SAMPLE_RATE, freq=220.0, amplitude=0.1)
            step = SAMPLE_RATE // 10 * 2  # 100 ms per delta
            for off in range(0, len(pcm), step):
                if self.cancelled:
                    break
                await self.emit(
                    "response.output_audio.delta",
                    **where,
                    delta=base64.b64encode(pcm[off : off + step]).decode(),
                )
            await self.emit("response.output_audio.done", **where)
            await self.emit("response.output_audio_transcript.done", **where, transcript=text)
            content = [{"type": "output_audio", "transcript": text}]
        else:
            await self.emit("response.output_text.delta", **where, delta=text)
            await self.emit("response.output_text.done", **where, text=text)
            content = [{"type": "output_text", "text": text}]
        done = {**item, "status": "completed", "content": content}
        await self.emit("response.output_item.done", response_id=response_id, output_index=index, item=done)
        return done

    async def _function_call(
        self, response_id: str, index: int, name: str, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        item_id, call_id = self._id("item"), self._id("call")
        item = {"id": item_id, "type": "function_call", "object": "realtime.item", "status": "in_progress",
                "call_id": call_id, "name": name, "arguments": ""}  # fmt: skip
        await self._added(response_id, index, item)
        raw = json.dumps(arguments)
        where = {"response_id": response_id, "item_id": item_id, "output_index": index, "call_id": call_id}
        await self.emit("response.function_call_arguments.delta", **where, delta=raw)
        await self.emit("response.function_call_arguments.done", **where, name=name, arguments=raw)
        done = {**item, "status": "completed", "arguments": raw}
        self.conn.log("function_call", name)
        await self.emit("response.output_item.done", response_id=response_id, output_index=index, item=done)
        return done


ROUTES: Final = (Route("GET", "/v1/realtime", OpenAIRealtime.handle),)
