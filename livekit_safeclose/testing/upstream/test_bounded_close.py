"""Every close of an AgentSession is bounded and complete: one test per hang class. Each
starts a real AgentSession on scripted fakes (FakeSTT/FakeLLM/FakeTTS, silent input, an output
that plays instantly or, for a caller who hung up, never), engages one fault, closes along one
path and asserts the bound, exactly one ``close`` event and no provider stream left open.
Without ``voice/_bounded_close.py`` each of them hangs."""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    Agent,
    AgentSession,
    APIConnectOptions,
    RunContext,
    function_tool,
    llm,
    stt,
    tts,
)
from livekit.agents.voice import io
from livekit.agents.voice.events import CloseEvent, CloseReason

try:
    _bounded_close: Any = importlib.import_module("livekit.agents.voice._bounded_close")
except ImportError:  # without the fix: every test below fails on its bound
    _bounded_close = None

pytestmark = pytest.mark.asyncio

DRAIN_TIMEOUT, CLOSE_TIMEOUT, GRACEFUL_TIMEOUT = 0.2, 1.0, 0.5
SLACK = 0.5  # for a loaded CI machine
SAMPLE_RATE = 16000


@pytest.fixture(autouse=True)
def _short_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("DRAIN", DRAIN_TIMEOUT), ("CLOSE", CLOSE_TIMEOUT), ("GRACEFUL", GRACEFUL_TIMEOUT)):
        if _bounded_close is not None:
            monkeypatch.setattr(_bounded_close, f"{name}_TIMEOUT", value)


class Provider:
    """Streams open at the fake provider; ``hang``: a cancelled stream waits for a goodbye."""

    def __init__(self) -> None:
        self.open = 0
        self.release = asyncio.Event()

    async def closing(self, fault: str) -> None:
        if fault == "hang":
            await asyncio.Event().wait()
        elif fault == "swallow":
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    continue


class FakeSTT(stt.STT):  # type: ignore[type-arg]
    def __init__(self, provider: Provider, *, close_fault: str = "none") -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=False))
        self.fake_provider, self.close_fault = provider, close_fault

    async def _recognize_impl(self, buffer: Any, *, language: Any = NOT_GIVEN, conn_options: Any) -> Any:
        raise NotImplementedError

    def stream(
        self, *, language: Any = NOT_GIVEN, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> FakeRecognizeStream:
        return FakeRecognizeStream(stt=self, conn_options=conn_options, sample_rate=SAMPLE_RATE)


class FakeRecognizeStream(stt.RecognizeStream):
    async def _run(self) -> None:
        fake = self._stt
        assert isinstance(fake, FakeSTT)
        fake.fake_provider.open += 1
        try:
            try:
                async for _ in self._input_ch:
                    pass
            finally:
                await fake.fake_provider.closing(fake.close_fault)
        finally:
            fake.fake_provider.open -= 1


@dataclass
class FakeLLMResponse:
    content: str = ""
    tool_calls: list[str] = field(default_factory=list)
    stall: bool = False


class FakeLLM(llm.LLM):  # type: ignore[type-arg]
    def __init__(self, provider: Provider, responses: list[FakeLLMResponse], *, close_fault: str = "none"):
        super().__init__()
        self.fake_provider, self.responses, self.close_fault = provider, responses, close_fault

    def chat(self, *, chat_ctx: llm.ChatContext, tools: Any = None, conn_options: Any = DEFAULT_API_CONNECT_OPTIONS,
             **_: Any) -> FakeLLMStream:  # fmt: skip
        resp = self.responses.pop(0) if self.responses else FakeLLMResponse(content="ok")
        return FakeLLMStream(self, resp, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class FakeLLMStream(llm.LLMStream):
    def __init__(self, fake: FakeLLM, resp: FakeLLMResponse, **kwargs: Any) -> None:
        super().__init__(fake, **kwargs)
        self._fake, self._resp = fake, resp

    async def _run(self) -> None:
        self._fake.fake_provider.open += 1
        try:
            if self._resp.stall:
                try:
                    await asyncio.Event().wait()
                finally:
                    await self._fake.fake_provider.closing(self._fake.close_fault)
            delta = llm.ChoiceDelta(role="assistant", content=self._resp.content or None)
            delta.tool_calls = [llm.FunctionToolCall(name=n, arguments=json.dumps({}), call_id=f"call_{i}")
                                for i, n in enumerate(self._resp.tool_calls)]  # fmt: skip
            self._event_ch.send_nowait(llm.ChatChunk(id="chat", delta=delta))
        finally:
            self._fake.fake_provider.open -= 1


class FakeTTS(tts.TTS):  # type: ignore[type-arg]
    def __init__(self, provider: Provider, *, stall: bool = False, close_fault: str = "none") -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True), sample_rate=SAMPLE_RATE, num_channels=1
        )
        self.fake_provider, self.stall, self.close_fault = provider, stall, close_fault

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> Any:
        return self._synthesize_with_stream(text, conn_options=conn_options)

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> FakeSynthesizeStream:
        return FakeSynthesizeStream(tts=self, conn_options=conn_options)


class FakeSynthesizeStream(tts.SynthesizeStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        fake = self._tts
        assert isinstance(fake, FakeTTS)
        fake.fake_provider.open += 1
        try:
            output_emitter.initialize(request_id="req", sample_rate=SAMPLE_RATE, num_channels=1,
                                      mime_type="audio/pcm", stream=True)  # fmt: skip
            try:
                if fake.stall:
                    await asyncio.Event().wait()
                async for item in self._input_ch:
                    if not isinstance(item, str):
                        output_emitter.start_segment(segment_id="seg")
                        output_emitter.push(b"\x00\x00" * (SAMPLE_RATE // 10))
                        output_emitter.end_segment()
            finally:
                await fake.fake_provider.closing(fake.close_fault)
        finally:
            fake.fake_provider.open -= 1


class SilentInput(io.AudioInput):
    def __init__(self) -> None:
        super().__init__(label="SilentInput")
        n = SAMPLE_RATE // 50
        self._frame = rtc.AudioFrame(b"\x00\x00" * n, SAMPLE_RATE, 1, n)

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.02)
        return self._frame


class FakeAudioOutput(io.AudioOutput):
    """Plays a segment out as soon as it is flushed; ``dead``: never (the caller hung up)."""

    def __init__(self, *, dead: bool = False) -> None:
        super().__init__(label="FakeAudioOutput", capabilities=io.AudioOutputCapabilities(pause=False))
        self.dead, self.frames, self._playing = dead, 0, False

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        self.frames += 1
        if not self._playing:
            self._playing = True
            self.on_playback_started(created_at=time.time())

    def flush(self) -> None:
        super().flush()
        self._finish(interrupted=False)

    def clear_buffer(self) -> None:
        self._finish(interrupted=True)

    def _finish(self, *, interrupted: bool) -> None:
        if self._playing and not self.dead:
            self._playing = False
            self.on_playback_finished(playback_position=0.0 if interrupted else 0.1, interrupted=interrupted)


class HangingToolset(llm.Toolset):
    async def aclose(self) -> None:
        await asyncio.Event().wait()


class MyAgent(Agent):
    def __init__(self, *, tool: str = "park", on_enter: str = "", on_exit: str = "", **kwargs: Any) -> None:
        super().__init__(instructions="You are a helpful assistant.", **kwargs)
        self.tool, self.enter, self.exit = tool, on_enter, on_exit
        self.engaged = asyncio.Event()
        self.released = asyncio.Event()  # lets a tool that swallows cancellation end

    async def _park(self, how: str) -> None:
        self.engaged.set()
        if how == "swallow":
            while not self.released.is_set():
                try:
                    await self.released.wait()
                except asyncio.CancelledError:
                    continue
        elif how.startswith("sleep:"):
            await asyncio.sleep(float(how[6:]))
        else:
            await asyncio.Event().wait()

    async def on_enter(self) -> None:
        if self.enter:
            await self._park(self.enter)

    async def on_exit(self) -> None:
        if self.exit:
            await self._park(self.exit)

    @function_tool
    async def lookup(self, context: RunContext[Any]) -> str:
        """Look something up."""
        if self.tool == "aclose":
            self.engaged.set()
            await context.session.aclose()
            return "closed"
        await self._park(self.tool)
        return "found it"


@dataclass
class Run:
    session: AgentSession[Any]
    agent: MyAgent
    provider: Provider
    closes: list[CloseEvent]


async def _start(agent: MyAgent, *, stt_fault: str = "none", tts_stall: bool = False, llm_stall: bool = False,
                 tool_call: bool = False, dead_sink: bool = False, tools: Any = ()) -> Run:  # fmt: skip
    provider = Provider()
    script = [FakeLLMResponse(stall=True)] if llm_stall else []
    script += [FakeLLMResponse(tool_calls=["lookup"])] if tool_call else []
    session: AgentSession[Any] = AgentSession(
        stt=FakeSTT(provider, close_fault=stt_fault),
        llm=FakeLLM(provider, script, close_fault="hang" if llm_stall else "none"),
        tts=FakeTTS(provider, stall=tts_stall, close_fault="hang" if tts_stall else "none"),
        tools=list(tools),
        session_close_transcript_timeout=0.1,
    )
    session.input.audio = SilentInput()
    session.output.audio = FakeAudioOutput(dead=dead_sink)
    closes: list[CloseEvent] = []
    session.on("close", closes.append)
    await session.start(agent)
    return Run(session, agent, provider, closes)


async def _assert_closed(run: Run, close: Any, *, bound: float = CLOSE_TIMEOUT) -> None:
    t0 = time.monotonic()
    await asyncio.wait_for(close, timeout=bound + SLACK)
    await asyncio.sleep(0.05)  # the close event is emitted before the closing task ends
    assert time.monotonic() - t0 < bound + SLACK
    assert len(run.closes) == 1
    assert run.session._activity is None
    assert run.provider.open == 0


async def _closed_event(run: Run) -> None:
    while not run.closes:
        await asyncio.sleep(0.01)


async def test_aclose_bounded_when_tool_hangs() -> None:
    run = await _start(MyAgent(tool="park"), tool_call=True)
    run.session.generate_reply(user_input="look it up")
    await asyncio.wait_for(run.agent.engaged.wait(), 5)
    await _assert_closed(run, run.session.aclose())


async def test_aclose_bounded_when_tool_swallows_cancellation() -> None:
    run = await _start(MyAgent(tool="swallow"), tool_call=True)
    run.session.generate_reply(user_input="look it up")
    await asyncio.wait_for(run.agent.engaged.wait(), 5)
    try:
        await _assert_closed(run, run.session.aclose())
    finally:
        run.agent.released.set()


async def test_shutdown_bounded_when_on_exit_hangs() -> None:
    run = await _start(MyAgent(on_exit="park"))
    run.session.shutdown(drain=False)
    await _assert_closed(run, _closed_event(run))


async def test_disconnect_close_bounded_when_on_enter_hangs() -> None:
    agent = MyAgent(on_enter="park")
    run = await _start(agent)
    await asyncio.wait_for(agent.engaged.wait(), 5)
    run.session._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
    await _assert_closed(run, _closed_event(run))


async def test_aclose_stops_stt_stream_whose_close_hangs() -> None:
    run = await _start(MyAgent(), stt_fault="hang")
    await asyncio.sleep(0.2)
    assert run.provider.open == 1
    await _assert_closed(run, run.session.aclose())


async def test_aclose_bounded_when_tts_stalls() -> None:
    run = await _start(MyAgent(), tts_stall=True)
    run.session.say("hello there")
    await asyncio.sleep(0.3)
    await _assert_closed(run, run.session.aclose())


async def test_aclose_bounded_when_llm_stalls() -> None:
    run = await _start(MyAgent(), llm_stall=True)
    run.session.generate_reply(user_input="hi")
    await asyncio.sleep(0.3)
    await _assert_closed(run, run.session.aclose())


async def test_aclose_bounded_when_toolset_close_hangs() -> None:
    run = await _start(MyAgent(), tools=[HangingToolset(id="hanging")])
    await _assert_closed(run, run.session.aclose())


async def test_tool_awaiting_its_own_session_close() -> None:
    agent = MyAgent(tool="aclose")
    run = await _start(agent, tool_call=True)
    run.session.generate_reply(user_input="hang up")
    await asyncio.wait_for(agent.engaged.wait(), 5)
    await _assert_closed(run, _closed_event(run))


async def test_graceful_shutdown_escalates_when_goodbye_never_plays_out() -> None:
    run = await _start(MyAgent(), dead_sink=True)
    run.session.say("goodbye")
    await asyncio.sleep(0.3)
    run.session.shutdown(drain=True)
    await _assert_closed(run, _closed_event(run), bound=GRACEFUL_TIMEOUT + CLOSE_TIMEOUT)


async def test_graceful_shutdown_still_waits_for_a_slow_tool() -> None:
    agent = MyAgent(tool="sleep:0.3")
    run = await _start(agent, tool_call=True)
    run.session.generate_reply(user_input="look it up")
    await asyncio.wait_for(agent.engaged.wait(), 5)
    t0 = time.monotonic()
    run.session.shutdown(drain=True)
    await _assert_closed(run, _closed_event(run), bound=GRACEFUL_TIMEOUT)
    assert time.monotonic() - t0 >= 0.25  # the tool finished: nothing was forced


async def test_shutdown_after_restart_closes_again() -> None:
    agent = MyAgent()
    run = await _start(agent)
    run.session.shutdown(drain=False)
    await _closed_event(run)
    await asyncio.sleep(0.1)
    run.closes.clear()
    await run.session.start(agent)
    run.session.shutdown(drain=False)
    await _assert_closed(run, _closed_event(run))


async def test_healthy_close_is_unchanged() -> None:
    run = await _start(MyAgent())
    await _assert_closed(run, run.session.aclose(), bound=0.5)
