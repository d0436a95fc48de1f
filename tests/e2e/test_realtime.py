"""Realtime models close bounded and complete: the real ``openai.realtime.RealtimeModel``
against the OpenAI Realtime stand-in, over real 127.0.0.1 sockets.

Each biting scenario runs with the layer (the close is bounded, the server holds no
realtime socket and no STT socket after it, nothing is left running for the session) and
on vanilla livekit-agents (still closing after a bounded wait, the realtime socket still
held). The no-close-ack scenario is a control: the client drops the socket itself, vanilla
included. The last tests drive an in-memory realtime session (subclassing the public base
class) whose ``aclose()`` never returns: the audio recognition is still closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from e2e_helpers import CLOSE_TIMEOUT, DRAIN_TIMEOUT, MARGIN, VANILLA_WAIT
from livekit import rtc
from livekit.agents import llm
from livekit.agents.types import NOT_GIVEN, NotGivenOr

import livekit_safeclose as lsc
import livekit_safeclose.completion as completion
from livekit_safeclose.testing._runs import LayerForRun
from livekit_safeclose.testing.e2e import (
    E2E_SCENARIOS,
    E2EAgent,
    E2EContext,
    E2EOutcome,
    make_e2e_session,
    make_models,
    run_e2e_scenario,
)
from livekit_safeclose.testing.standins import ProviderServer

BITING = [s.id for s in E2E_SCENARIOS.values() if s.realtime and s.vanilla_hangs]
CONTROLS = [s.id for s in E2E_SCENARIOS.values() if s.realtime and not s.vanilla_hangs]


async def _run(name: str, srv: ProviderServer, *, patched: bool, observe: float = 0.0) -> E2EOutcome:
    return await run_e2e_scenario(
        name,
        patched=patched,
        server=srv,
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        limit=CLOSE_TIMEOUT + MARGIN if patched else VANILLA_WAIT,
        observe=observe,
    )


def test_catalogue_has_the_realtime_scenarios() -> None:
    assert set(BITING) == {
        "realtime-tool-stuck",
        "realtime-tool-unanswered",
        "realtime-no-handshake",
        "realtime-disconnect",
    }
    assert CONTROLS == ["realtime-no-close-ack"]


@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize("name", BITING)
async def test_layer_closes_realtime_sessions_bounded_and_complete(srv: ProviderServer, name: str) -> None:
    out = await _run(name, srv, patched=True, observe=0.5)
    assert out.engaged and not out.error, out.summary()
    assert out.closed and out.ms <= (CLOSE_TIMEOUT + MARGIN) * 1000, out.summary()
    # the provider's view: no realtime socket (or held upgrade) and no STT socket
    assert out.realtime_open_at_close == 0 and out.realtime_open_after == 0, out.summary()
    assert out.stt_open_after == 0, out.summary()
    # nothing outlives the close
    assert out.tasks_left == 0, out.summary()
    assert out.close_events == 1, out.summary()
    assert out.report is not None and out.report.forced, out.summary()


@pytest.mark.vanilla
@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize("name", BITING)
async def test_vanilla_keeps_the_realtime_session_open(srv: ProviderServer, name: str) -> None:
    out = await _run(name, srv, patched=False)
    assert out.engaged and not out.error, out.summary()
    assert not out.closed and out.close_events == 0, out.summary()
    assert out.realtime_open_at_close == 1, out.summary()
    assert out.tasks_left > 0, out.summary()


@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize("name", CONTROLS)
@pytest.mark.parametrize("patched", [False, True], ids=["vanilla", "layer"])
async def test_unanswered_close_frame_is_a_control(srv: ProviderServer, name: str, patched: bool) -> None:
    out = await _run(name, srv, patched=patched, observe=0.3)
    assert out.engaged and not out.error, out.summary()
    assert out.closed and out.ms <= 1000, out.summary()
    assert out.realtime_open_after == 0 and out.stt_open_after == 0 and out.tasks_left == 0, out.summary()
    assert out.clean_closes["openai_realtime"] == 1 and out.close_events == 1, out.summary()
    if patched:
        assert out.report is not None and not out.report.forced, out.summary()


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_held_upgrade_is_swept_and_named_in_the_report(srv: ProviderServer) -> None:
    out = await _run("realtime-no-handshake", srv, patched=True)
    assert out.closed and out.realtime_open_after == 0, out.summary()
    report = out.report
    assert report is not None
    assert any(s.startswith("realtime:RealtimeSession@") for s in report.streams_closed_by_force), report
    # the swept main task cancelled upstream's activity close early: the audio recognition
    # (the STT goodbye) is still closed
    assert any(s.name == "audio_recognition.aclose" and s.outcome == "done" for s in report.steps), report


@pytest.mark.timeout(30)
@pytest.mark.asyncio
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "without-the-finisher"])
async def test_task_waiting_on_the_closed_realtime_session_is_stopped_and_named(
    srv: ProviderServer, monkeypatch: pytest.MonkeyPatch, fixed: bool
) -> None:
    """The tool's cancellation outlasts the drain phase; when it returns, the tool runner
    pushes its result to the realtime session (``update_chat_ctx``), whose confirmation the
    stand-in holds until after the close: the client never delivers it. Without the
    realtime finisher that task waits its 5 s out after the close returned."""
    if not fixed:
        monkeypatch.setattr(completion, "FINISHERS", ())
    out = await _run("realtime-tool-unanswered", srv, patched=True)
    assert out.closed and out.realtime_open_after == 0, out.summary()
    report = out.report
    assert report is not None
    waits = [s for s in report.steps if s.name == "realtime.waits"]
    if not fixed:
        assert out.tasks_left == 1 and "tool_exec_lookup" in out.tasks_left_names[0], out.summary()
        assert not waits
        return
    assert out.tasks_left == 0, out.summary()
    assert len(waits) == 1 and waits[0].outcome == "done", report.steps
    assert "1/1 stopped" in waits[0].detail and "in update_chat_ctx" in waits[0].detail, waits[0]


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_ledger_counts_realtime_sessions(srv: ProviderServer) -> None:
    install = LayerForRun(True, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
    models = make_models(srv, realtime=True)
    try:
        session, _ = make_e2e_session(models)
        await session.start(E2EAgent(E2EContext()))
        assert await srv.await_open("openai_realtime", 1, 5.0)
        assert lsc.open_streams(session)["realtime"] == 1
        assert lsc.open_streams()["realtime"] == 1
        await asyncio.wait_for(session.aclose(), CLOSE_TIMEOUT + MARGIN)
        assert lsc.open_streams(session)["realtime"] == 0
        assert await srv.await_open("openai_realtime", 0, 1.0)
    finally:
        await models.aclose()
        install.restore()


# --------------------------------------------------------------- a realtime aclose that never returns


class _HangingRealtime(llm.RealtimeModel):
    def __init__(self) -> None:
        super().__init__(
            capabilities=llm.RealtimeCapabilities(
                message_truncation=False,
                turn_detection=False,
                user_transcription=False,
                auto_tool_reply_generation=False,
                audio_output=False,
                manual_function_calls=False,
            )
        )
        self.release = asyncio.Event()
        self.sessions: list[_HangingSession] = []

    def session(self, *, turn_detection_disabled: bool = False) -> llm.RealtimeSession:
        sess = _HangingSession(self)
        self.sessions.append(sess)
        return sess

    async def aclose(self) -> None:
        self.release.set()


class _HangingSession(llm.RealtimeSession):
    """Its connection is a task that runs until released; its ``aclose()`` never returns
    (it swallows every cancellation) until released."""

    def __init__(self, model: _HangingRealtime) -> None:
        super().__init__(model)
        self._model = model
        self._main_atask = asyncio.create_task(model.release.wait(), name="_HangingSession.main")
        self.close_entered = asyncio.Event()

    @property
    def chat_ctx(self) -> llm.ChatContext:
        return llm.ChatContext.empty()

    @property
    def tools(self) -> llm.ToolContext:
        return llm.ToolContext.empty()

    async def update_instructions(self, instructions: str) -> None:
        pass

    async def update_chat_ctx(self, chat_ctx: llm.ChatContext) -> None:
        pass

    async def update_tools(self, tools: list[llm.Tool]) -> None:
        pass

    def update_options(self, *, tool_choice: NotGivenOr[llm.ToolChoice | None] = NOT_GIVEN) -> None:
        pass

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        pass

    def push_video(self, frame: rtc.VideoFrame) -> None:
        pass

    def generate_reply(self, **_: Any) -> asyncio.Future[llm.GenerationCreatedEvent]:
        return asyncio.get_running_loop().create_future()

    def commit_audio(self) -> None:
        pass

    def clear_audio(self) -> None:
        pass

    def interrupt(self) -> None:
        pass

    def truncate(self, **_: Any) -> None:
        pass

    async def aclose(self) -> None:
        self.close_entered.set()
        while not self._model.release.is_set():
            try:
                await self._model.release.wait()
            except asyncio.CancelledError:
                continue


async def _hanging_close(srv: ProviderServer, *, patched: bool) -> tuple[bool, float, int, Any]:
    install = LayerForRun(patched, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
    models = make_models(srv)
    rt = _HangingRealtime()
    models_llm, models.llm = models.llm, rt
    closer: asyncio.Future[None] | None = None
    try:
        session, _ = make_e2e_session(models)
        await session.start(E2EAgent(E2EContext()))
        assert await srv.await_open("inference_stt", 1, 5.0)
        t0 = time.monotonic()
        closer = asyncio.ensure_future(session.aclose())
        await asyncio.wait({closer}, timeout=CLOSE_TIMEOUT + MARGIN if patched else VANILLA_WAIT)
        ms = (time.monotonic() - t0) * 1000
        assert rt.sessions and rt.sessions[0].close_entered.is_set()
        await asyncio.sleep(0.05)
        stt_open = srv.open_connections("inference_stt")
        return closer.done(), ms, stt_open, lsc.last_close_report(session) if patched else None
    finally:
        rt.release.set()
        if closer is not None:
            await asyncio.wait({closer}, timeout=1.0)
        await models_llm.aclose()
        await models.aclose()
        install.restore()


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_abandoned_realtime_close_still_closes_the_audio_recognition(srv: ProviderServer) -> None:
    closed, ms, stt_open, report = await _hanging_close(srv, patched=True)
    assert closed and ms <= (CLOSE_TIMEOUT + MARGIN) * 1000, ms
    assert report is not None and "activity.aclose" in report.abandoned, report
    assert any(s.name == "audio_recognition.aclose" and s.outcome == "done" for s in report.steps), report
    # the STT provider saw its connection end, and the realtime session was stopped
    assert stt_open == 0
    assert any(s.startswith("realtime:_HangingSession@") for s in report.streams_closed_by_force), report


@pytest.mark.vanilla
@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_vanilla_realtime_close_that_never_returns_keeps_the_stt_open(srv: ProviderServer) -> None:
    closed, _, stt_open, _ = await _hanging_close(srv, patched=False)
    assert not closed and stt_open == 1
