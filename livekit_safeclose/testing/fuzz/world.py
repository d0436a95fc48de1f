"""The parts a schedule is replayed on: the agents, the tools, the fake LLM that calls them,
and the session built from a :class:`~.schedule.Setup`.

Built from the scenario catalogue's parts (``Ctx``, ``ScenarioAgent``, ``StuckTask``,
``HangingToolset``) and the fault-injecting fakes: a real ``AgentSession`` with the real
Silero VAD. The fake LLM answers by what the last user turn asks for (``do:tool:stuck``),
so a step's effect never depends on which earlier reply consumed a script.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import Agent, AgentSession, AgentTask, RunContext, function_tool, llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from ..fakes import (
    DeadAudioOutput,
    FakeLLM,
    FakeLLMStream,
    FakeReply,
    FakeSTT,
    FakeTTS,
    FastAudioOutput,
    SilenceInput,
)
from ..features import transcript_kwargs
from ..scenarios.agents import Ctx, HangingToolset, ScenarioAgent, StuckTask
from ..scenarios.runner import load_vad
from .schedule import SLOW_S, Hook, Setup


@dataclass
class Request:
    """One close request: where it came from, whether it was graceful, when it was made
    (and, for an awaited one, when it returned)."""

    path: str
    graceful: bool
    issued: float
    #: the session was running (or starting) when the request was made; for an error,
    #: the session heard it (:func:`heard_by`)
    running: bool
    returned: float | None = None
    error: str = ""
    #: the layer's close the request started or joined (a ``BoundedClose``)
    close: Any = None


@dataclass
class World:
    """A schedule's moving parts, shared by the replay, the tools and the checks."""

    setup: Setup
    ctx: Ctx = field(default_factory=Ctx)
    requests: list[Request] = field(default_factory=list)
    close_events: list[tuple[float, Any]] = field(default_factory=list)
    starts: int = 0
    #: ``slow`` tools: started, and cancelled before they finished (with when)
    slow_started: int = 0
    slow_cancelled: list[float] = field(default_factory=list)
    step_errors: list[str] = field(default_factory=list)
    #: the STT delivered the caller's last words as a final transcript
    transcribed: bool = False
    #: called with each request a tool makes (the replay links it to the close it started)
    on_request: Callable[[Request], None] | None = None

    @property
    def session(self) -> AgentSession[Any]:
        assert self.ctx.session is not None
        return self.ctx.session

    def running(self) -> bool:
        s = self.session
        return bool(s._started) or s._activity is not None or s._lock.locked()

    def request(self, path: str, graceful: bool, *, running: bool | None = None) -> Request:
        running = self.running() if running is None else running
        req = Request(path, graceful, time.monotonic(), running)
        self.requests.append(req)
        if path.startswith("tool:") and self.on_request is not None:
            self.on_request(req)
        return req


def heard_by(session: AgentSession[Any], model: Any) -> bool:
    """Whether an activity of ``session`` listens to ``model``'s errors. Upstream subscribes
    only when an activity starts its session (after ``start()``'s toolset setup and agent
    change), and a provider only errors from the streams that activity opens: an error
    emitted before then reaches no session and is no close request."""
    listeners = getattr(model, "_events", {}).get("error", ())
    return any(getattr(getattr(fn, "__self__", None), "_session", None) is session for fn in listeners)


#: what the STT answers the close's end-of-turn flush with (``Setup.final_on_flush``)
LAST_WORDS = "my last words"


def hook(how: Hook) -> str | None:
    """The ``Ctx.park`` mode of a hook."""
    return f"sleep:{SLOW_S}" if how == "slow" else how


class FuzzLLM(FakeLLM):
    """Answers what the last user turn asks for: ``do:text``, ``do:stall``, ``do:tool:X``,
    ``do:talk+tool:X``; a turn after a tool's output gets a short text."""

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: Any = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> FakeLLMStream:
        items = chat_ctx.items
        last = items[-1] if items else None
        text = last.text_content if isinstance(last, llm.ChatMessage) and last.role == "user" else None
        return FakeLLMStream(
            self, _reply(text or ""), chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options
        )


def _reply(ask: str) -> FakeReply:
    what = ask.removeprefix("do:")
    if what == "stall":
        return FakeReply(stall=True)
    talk, _, tool = what.partition("tool:")
    if tool:
        return FakeReply(text="One moment." if talk else "", tool_calls=[(f"{tool}_tool", {})])
    return FakeReply(text="Sure, here you go." if ask else "Done.")


class QuickTask(AgentTask[None]):
    """An ``AgentTask`` that completes as soon as it is entered."""

    def __init__(self) -> None:
        super().__init__(instructions="A task that completes at once.")

    async def on_enter(self) -> None:
        self.complete(None)


class FuzzAgent(ScenarioAgent):
    """An agent with one tool per :data:`~.schedule.TOOLS` entry."""

    def __init__(self, world: World, *, on_enter: Hook, on_exit: Hook, label: str, **kw: Any) -> None:
        super().__init__(world.ctx, on_enter=hook(on_enter), on_exit=hook(on_exit), label=label, **kw)
        self._world = world

    @function_tool
    async def fast_tool(self) -> str:
        """Answer at once."""
        return "fast"

    @function_tool
    async def slow_tool(self) -> str:
        """Take a while."""
        world = self._world
        world.slow_started += 1
        try:
            await asyncio.sleep(SLOW_S)
        except asyncio.CancelledError:
            world.slow_cancelled.append(time.monotonic())
            raise
        return "slow"

    @function_tool
    async def stuck_tool(self) -> str:
        """Never answer."""
        await self._world.ctx.park("park")
        return "stuck"

    @function_tool
    async def swallow_tool(self) -> str:
        """Never answer, whatever happens."""
        await self._world.ctx.park("swallow")
        return "swallow"

    @function_tool
    async def aclose_tool(self) -> str:
        """Close the session and wait for it."""
        world = self._world
        req = world.request("tool:aclose", graceful=False)
        try:
            await world.session.aclose()
        finally:
            req.returned = time.monotonic()
        return "closed"

    @function_tool
    async def shutdown_tool(self) -> str:
        """End the call (gracefully)."""
        world = self._world
        world.request("tool:shutdown", graceful=True)
        world.session.shutdown(drain=True)
        return "ending"

    @function_tool
    async def handoff_tool(self) -> tuple[Agent, str]:
        """Hand off to the next agent."""
        w = self._world
        nxt = FuzzAgent(w, on_enter=w.setup.next_on_enter, on_exit=w.setup.next_on_exit, label="next")
        return nxt, "handing off"

    @function_tool
    async def task_tool(self) -> str:
        """Run a quick task."""
        await QuickTask()
        return "task done"

    @function_tool
    async def stuck_task_tool(self) -> str:
        """Run a task that never finishes entering."""
        await StuckTask(self._world.ctx)
        return "task done"

    @function_tool
    async def playout_tool(self, context: RunContext[Any]) -> str:
        """Wait until what was said played out."""
        await context.wait_for_playout()
        return "played"

    @function_tool
    async def say_tool(self, context: RunContext[Any]) -> str:
        """Say something from inside the tool."""
        context.session.say("Still looking.")
        return "said"


def first_agent(world: World) -> FuzzAgent:
    s = world.setup
    tools: Sequence[Any] = [HangingToolset(world.ctx, hang_setup=True)] if s.toolset == "setup" else []
    if s.toolset == "close":
        tools = [HangingToolset(world.ctx, hang_close=True)]
    return FuzzAgent(world, on_enter=s.on_enter, on_exit=s.on_exit, label="first", tools=list(tools))


def build_session(world: World) -> AgentSession[Any]:
    """A roomless session on the fakes and the real Silero VAD, as the setup says."""
    s, ctx = world.setup, world.ctx
    ledger = ctx.ledger
    session_tools: list[Any] = [HangingToolset(ctx, hang_close=True)] if s.toolset == "session-close" else []
    session: AgentSession[Any] = AgentSession(
        stt=FakeSTT(ledger, close_fault=s.stt_close, transcript=LAST_WORDS, final_on_flush=s.final_on_flush),
        llm=FuzzLLM(ledger, close_fault=s.llm_close),
        tts=FakeTTS(ledger, close_fault=s.tts_close),
        tools=session_tools,
        vad=load_vad(),
        **transcript_kwargs(s.transcript_timeout),
    )
    session.input.audio = SilenceInput()
    session.output.audio = DeadAudioOutput() if s.dead_sink else FastAudioOutput()
    ctx.session = session

    def transcribed(ev: Any) -> None:
        if ev.is_final and LAST_WORDS in ev.transcript:
            world.transcribed = True

    session.on("user_input_transcribed", transcribed)
    return session
