"""Fault-injecting fakes built on livekit-agents' public base classes.

They exist for deterministic fault injection only (a stream whose close hangs, one that
swallows cancellation, an LLM that calls a given tool). Each fake "connection" is counted
in a :class:`ProviderLedger`, which is the provider's view: open until the stream's main
task really ends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from livekit import rtc
from livekit.agents import APIConnectOptions, llm, stt, tts
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr
from livekit.agents.voice import io

CloseFault = Literal["none", "hang", "swallow"]
"""How a fake stream behaves when cancelled: ``hang`` waits for a goodbye that never
comes (a second cancellation ends it), ``swallow`` ignores every cancellation until
:meth:`ProviderLedger.release` (a zombie nothing can stop)."""

SAMPLE_RATE = 16000
_ids = itertools.count(1)


class ProviderLedger:
    """Connections open per kind (``stt``, ``tts``, ``llm``), as a provider would count them."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self._release = asyncio.Event()

    def open(self, kind: str) -> None:
        self.opened[kind] += 1

    def close(self, kind: str) -> None:
        self.closed[kind] += 1

    def open_count(self, kind: str | None = None) -> int:
        kinds = [kind] if kind else list(self.opened)
        return sum(self.opened[k] - self.closed[k] for k in kinds)

    def release(self) -> None:
        """Let every zombie (``swallow``) stream end, so a test leaves no task behind."""
        self._release.set()

    async def _closing(self, fault: CloseFault) -> None:
        """Run inside a stream's ``finally`` after it was cancelled."""
        if fault == "hang":
            await asyncio.Event().wait()
        elif fault == "swallow":
            while not self._release.is_set():
                try:
                    await self._release.wait()
                except asyncio.CancelledError:
                    continue


async def _park(ledger: ProviderLedger, fault: CloseFault) -> None:
    """Wait forever; how a cancellation is received depends on ``fault``."""
    try:
        await asyncio.Event().wait()
    finally:
        await ledger._closing(fault)


# -- STT ---------------------------------------------------------------------------------


class FakeSTT(stt.STT):  # type: ignore[type-arg]
    """Streaming STT. ``final_after`` frames of input produce one final transcript;
    ``final_on_flush`` answers the close's end-of-turn flush (its 200 ms silence frames)
    with one final transcript, as a provider finalizing the last utterance would."""

    def __init__(
        self,
        ledger: ProviderLedger,
        *,
        close_fault: CloseFault = "none",
        transcript: str = "hello",
        final_after: int | None = None,
        final_on_flush: bool = False,
    ) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=True))
        self.ledger = ledger
        self.close_fault = close_fault
        self.transcript = transcript
        self.final_after = final_after
        self.final_on_flush = final_on_flush
        self.streams: list[FakeRecognizeStream] = []

    async def _recognize_impl(
        self, buffer: Any, *, language: Any = NOT_GIVEN, conn_options: APIConnectOptions
    ) -> stt.SpeechEvent:
        return _final(self.transcript)

    def stream(
        self,
        *,
        language: Any = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> FakeRecognizeStream:
        s = FakeRecognizeStream(self, conn_options=conn_options)
        self.streams.append(s)
        return s


def _final(text: str) -> stt.SpeechEvent:
    return stt.SpeechEvent(
        type=stt.SpeechEventType.FINAL_TRANSCRIPT,
        alternatives=[stt.SpeechData(language="en", text=text)],  # type: ignore[arg-type]
    )


class FakeRecognizeStream(stt.RecognizeStream):
    def __init__(self, fake: FakeSTT, *, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=fake, conn_options=conn_options, sample_rate=SAMPLE_RATE)
        self._fake = fake
        self.frames = 0

    async def _run(self) -> None:
        ledger = self._fake.ledger
        ledger.open("stt")
        flushed = False
        try:
            try:
                async for item in self._input_ch:
                    if isinstance(item, rtc.AudioFrame):
                        self.frames += 1
                        fake = self._fake
                        if fake.final_after and self.frames % fake.final_after == 0:
                            self._event_ch.send_nowait(_final(fake.transcript))
                        elif fake.final_on_flush and not flushed and item.duration >= 0.1:
                            flushed = True
                            self._event_ch.send_nowait(_final(fake.transcript))
            finally:
                await ledger._closing(self._fake.close_fault)
        finally:
            ledger.close("stt")


# -- TTS ---------------------------------------------------------------------------------


class FakeTTS(tts.TTS):  # type: ignore[type-arg]
    """Streaming TTS producing 10 ms of silence per character. ``stall`` makes a stream
    accept text and never produce audio nor end."""

    def __init__(
        self, ledger: ProviderLedger, *, close_fault: CloseFault = "none", stall: bool = False
    ) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True), sample_rate=SAMPLE_RATE, num_channels=1
        )
        self.ledger = ledger
        self.close_fault = close_fault
        self.stall = stall

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> FakeSynthesizeStream:
        return FakeSynthesizeStream(tts=self, conn_options=conn_options)


class FakeSynthesizeStream(tts.SynthesizeStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        fake = self._tts
        assert isinstance(fake, FakeTTS)
        fake.ledger.open("tts")
        try:
            output_emitter.initialize(
                request_id=f"req{next(_ids)}",
                sample_rate=SAMPLE_RATE,
                num_channels=1,
                mime_type="audio/pcm",
                stream=True,
            )
            if fake.stall:
                await _park(fake.ledger, fake.close_fault)
                return
            text = ""
            try:
                async for item in self._input_ch:
                    if isinstance(item, str):
                        text += item
                        continue
                    output_emitter.start_segment(segment_id=f"seg{next(_ids)}")
                    output_emitter.push(b"\x00\x00" * (SAMPLE_RATE // 100) * max(1, len(text)))
                    output_emitter.end_segment()
                    text = ""
            finally:
                if fake.close_fault != "none":
                    await fake.ledger._closing(fake.close_fault)
        finally:
            fake.ledger.close("tts")


# -- LLM ---------------------------------------------------------------------------------


@dataclass
class FakeReply:
    """One scripted LLM answer: text and/or tool calls ``(name, arguments)``."""

    text: str = ""
    tool_calls: Sequence[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stall: bool = False


class FakeLLM(llm.LLM):  # type: ignore[type-arg]
    """Replays a script of :class:`FakeReply`; answers ``"ok"`` when it runs out."""

    def __init__(
        self, ledger: ProviderLedger, script: Sequence[FakeReply] = (), *, close_fault: CloseFault = "none"
    ) -> None:
        super().__init__()
        self.ledger = ledger
        self.script = list(script)
        self.close_fault = close_fault
        self.requests: list[llm.ChatContext] = []

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> FakeLLMStream:
        self.requests.append(chat_ctx.copy())
        reply = self.script.pop(0) if self.script else FakeReply(text="ok")
        return FakeLLMStream(self, reply, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class FakeLLMStream(llm.LLMStream):
    def __init__(
        self,
        fake: FakeLLM,
        reply: FakeReply,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(fake, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._fake = fake
        self._reply = reply

    async def _run(self) -> None:
        ledger = self._fake.ledger
        ledger.open("llm")
        try:
            if self._reply.stall:
                await _park(ledger, self._fake.close_fault)
                return
            rid = f"chat{next(_ids)}"
            if self._reply.text:
                self._event_ch.send_nowait(
                    llm.ChatChunk(id=rid, delta=llm.ChoiceDelta(role="assistant", content=self._reply.text))
                )
            calls = [
                llm.FunctionToolCall(name=name, arguments=json.dumps(args), call_id=f"call{next(_ids)}")
                for name, args in self._reply.tool_calls
            ]
            if calls:
                self._event_ch.send_nowait(
                    llm.ChatChunk(id=rid, delta=llm.ChoiceDelta(role="assistant", tool_calls=calls))
                )
        finally:
            ledger.close("llm")


# -- audio I/O ---------------------------------------------------------------------------


class SilenceInput(io.AudioInput):
    """Real-time paced 20 ms frames of silence: keeps the STT stream open like a quiet caller."""

    def __init__(self) -> None:
        super().__init__(label="SilenceInput")
        self._frame = rtc.AudioFrame(
            data=b"\x00\x00" * (SAMPLE_RATE // 50),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
            samples_per_channel=SAMPLE_RATE // 50,
        )

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.02)
        return self._frame


class FastAudioOutput(io.AudioOutput):
    """Plays every segment instantly (or after ``delay`` s): speech finishes as soon as
    its audio is flushed, so healthy turns are fast and deterministic."""

    def __init__(self, *, delay: float = 0.0) -> None:
        super().__init__(label="FastAudioOutput", capabilities=io.AudioOutputCapabilities(pause=False))
        self._delay = delay
        self._pushed = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pending = False

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._pending:
            self._pending = True
            self.on_playback_started(created_at=asyncio.get_running_loop().time())
        self._pushed += frame.duration

    def flush(self) -> None:
        super().flush()
        if not self._pending:
            return
        pos = self._pushed
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._finish, pos, False)

    def _finish(self, pos: float, interrupted: bool) -> None:
        self._timer = None
        if self._pending:
            self._pending = False
            self._pushed = 0.0
            self.on_playback_finished(playback_position=pos, interrupted=interrupted)

    def clear_buffer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._finish(0.0, True)


class DeadAudioOutput(io.AudioOutput):
    """The sink of a caller who already hung up: it takes every frame and starts playing,
    but never reports the playout finished, so a speech into it never ends by itself
    (livekit/agents#5497, #5359)."""

    def __init__(self) -> None:
        super().__init__(label="DeadAudioOutput", capabilities=io.AudioOutputCapabilities(pause=False))
        self._started = False
        self.frames = 0

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        self.frames += 1
        if not self._started:
            self._started = True
            self.on_playback_started(created_at=asyncio.get_running_loop().time())

    def flush(self) -> None:
        super().flush()

    def clear_buffer(self) -> None:
        pass
