"""The scenario catalogue: every known way a session close hangs, plus healthy controls.

One source of truth for the regression tests, ``livekit-safeclose check`` and the
benchmarks. Each scenario starts a real, roomless ``AgentSession`` (real Silero VAD,
fault-injecting fakes for the models), drives it until the fault is engaged, closes it
along one close path, and measures the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from livekit.agents import Agent, AgentSession, AgentTask, RunContext, function_tool, llm, stt
from livekit.agents.voice.events import CloseReason

from ..bounded_close import closing_of
from ._runs import LayerForRun, cancel_since, tasks_since
from .fakes import FakeLLM, FakeReply, FakeSTT, FakeTTS, FastAudioOutput, ProviderLedger, SilenceInput

ClosePath = Literal["aclose", "shutdown", "disconnect", "error", "graceful"]
CLOSE_PATHS: tuple[ClosePath, ...] = ("aclose", "shutdown", "disconnect", "error")

#: the final-transcript wait the scenarios configure (upstream default: 2 s); short so a
#: silent fake STT does not dominate every measurement. One test keeps the default.
TRANSCRIPT_TIMEOUT = 0.3


class Ctx:
    """What a scenario's setup shares with the runner."""

    def __init__(self) -> None:
        self.ledger = ProviderLedger()
        self.engaged = asyncio.Event()
        self.session: AgentSession[Any] | None = None
        self.stt_kwargs: dict[str, Any] = {}
        self.tts_kwargs: dict[str, Any] = {}
        self.llm_close_fault: Any = "none"
        self.script: list[FakeReply] = []
        self.session_tools: list[Any] = []
        self.tool_finished = asyncio.Event()
        self.extra: dict[str, Any] = {}

    async def park(self, how: str) -> None:
        """Where a stuck tool or hook sits. ``park``: honours cancellation; ``swallow``:
        ignores it until the ledger is released; ``sleep:N``: finite but slow."""
        self.engaged.set()
        if how.startswith("sleep:"):
            await asyncio.sleep(float(how.split(":", 1)[1]))
            return
        if how == "swallow":
            release = self.ledger._release
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    continue
            return
        await asyncio.Event().wait()


class ScenarioAgent(Agent):
    """An agent whose tool, ``on_enter`` and ``on_exit`` behave as the scenario says."""

    def __init__(
        self,
        ctx: Ctx,
        *,
        tool: str = "park",
        on_enter: str | None = None,
        on_exit: str | None = None,
        handoff_to: Agent | None = None,
        task: Callable[[], AgentTask[Any]] | None = None,
        tools: list[Any] | None = None,
        label: str = "scenario",
    ) -> None:
        super().__init__(instructions="You are a test agent.", tools=tools or [])
        self._ctx, self._tool, self._enter, self._exit = ctx, tool, on_enter, on_exit
        self._handoff_to, self._task = handoff_to, task
        self._label = label

    @property
    def label(self) -> str:
        return self._label

    async def on_enter(self) -> None:
        if self._enter:
            await self._ctx.park(self._enter)

    async def on_exit(self) -> None:
        if self._exit:
            await self._ctx.park(self._exit)

    @function_tool
    async def lookup(self, context: RunContext[Any]) -> Any:
        """Look something up."""
        if self._handoff_to is not None:
            return self._handoff_to, "handing off"
        if self._task is not None:
            await self._task()
            return "task done"
        if self._tool == "aclose":
            self._ctx.engaged.set()
            assert self._ctx.session is not None
            await self._ctx.session.aclose()
            self._ctx.tool_finished.set()
            return "closed"
        await self._ctx.park(self._tool)
        self._ctx.tool_finished.set()
        return "found it"


class StuckTask(AgentTask[None]):
    def __init__(self, ctx: Ctx) -> None:
        super().__init__(instructions="A task whose on_enter never returns.")
        self._ctx = ctx

    async def on_enter(self) -> None:
        await self._ctx.park("park")


class HangingToolset(llm.Toolset):
    """A toolset (think MCP server) whose ``setup()`` or ``aclose()`` never returns."""

    def __init__(self, ctx: Ctx, *, hang_setup: bool = False, hang_close: bool = False) -> None:
        super().__init__(id=f"hanging_{id(self):x}")
        self._ctx, self._hang_setup, self._hang_close = ctx, hang_setup, hang_close

    async def setup(self) -> HangingToolset:
        if self._hang_setup:
            await self._ctx.park("park")
        return self

    async def aclose(self) -> None:
        if self._hang_close:
            await asyncio.Event().wait()


Setup = Callable[[Ctx], Awaitable[Agent]]
Trigger = Callable[[Ctx], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """One named close scenario."""

    id: str
    stuck: str
    path: ClosePath
    description: str
    setup: Setup
    trigger: Trigger | None = None
    vanilla_hangs: bool = True
    #: a close must end within drain bound (True) or may use the full close bound
    drain_only: bool = False
    #: the stream can't be closed by anyone (swallows every cancellation)
    zombie_stream: bool = False
    #: the session is closed once, restarted, then closed along ``path``
    restart: bool = False
    #: start() is still running when the close begins
    during_start: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


async def _reply_calls_tool(ctx: Ctx) -> None:
    assert ctx.session is not None
    ctx.session.generate_reply(user_input="please look it up")


def _tool_agent(tool: str) -> Setup:
    async def setup(ctx: Ctx) -> Agent:
        ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
        return ScenarioAgent(ctx, tool=tool)

    return setup


def _hook_agent(on_enter: str | None = None, on_exit: str | None = None) -> Setup:
    async def setup(ctx: Ctx) -> Agent:
        return ScenarioAgent(ctx, on_enter=on_enter, on_exit=on_exit)

    return setup


async def _engage_on_exit(ctx: Ctx) -> None:
    ctx.engaged.set()  # on_exit only runs inside the close itself


def _handoff(old_exit: str | None, new_enter: str | None) -> Setup:
    async def setup(ctx: Ctx) -> Agent:
        ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
        new = ScenarioAgent(ctx, on_enter=new_enter, label="new_agent")
        return ScenarioAgent(ctx, on_exit=old_exit, handoff_to=new, label="old_agent")

    return setup


async def _agent_task(ctx: Ctx) -> Agent:
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    return ScenarioAgent(ctx, task=lambda: StuckTask(ctx))


def _faulty_models(**kw: Any) -> Setup:
    async def setup(ctx: Ctx) -> Agent:
        ctx.stt_kwargs = kw.get("stt", {})
        ctx.tts_kwargs = kw.get("tts", {})
        ctx.llm_close_fault = kw.get("llm_fault", "none")
        if kw.get("llm_stall"):
            ctx.script = [FakeReply(stall=True)]
        return ScenarioAgent(ctx)

    return setup


async def _engage_now(ctx: Ctx) -> None:
    ctx.engaged.set()


async def _reply_engaged_when_streaming(ctx: Ctx) -> None:
    assert ctx.session is not None
    ctx.session.generate_reply(user_input="say something")
    # engaged once the stalled stream is open at the "provider"
    for _ in range(200):
        if ctx.ledger.open_count("tts") or ctx.ledger.open_count("llm"):
            break
        await asyncio.sleep(0.01)
    ctx.engaged.set()


def _toolsets(scope: Literal["session", "agent"], **kw: Any) -> Setup:
    async def setup(ctx: Ctx) -> Agent:
        ts = HangingToolset(ctx, **kw)
        if scope == "session":
            ctx.session_tools = [ts]
            return ScenarioAgent(ctx)
        return ScenarioAgent(ctx, tools=[ts])

    return setup


@dataclass(frozen=True)
class _HangClass:
    """A hang class, expanded into one scenario per close path it applies to."""

    key: str
    stuck: str
    description: str
    setup: Setup
    trigger: Trigger | None
    paths: tuple[ClosePath, ...] = CLOSE_PATHS
    during_start: bool = False
    restart: bool = False


HANG_CLASSES: tuple[_HangClass, ...] = (
    _HangClass("tool-park", "tool parked on an await (honours cancellation)",
               "A function tool awaits something that never comes; the interrupt cannot reach it "
               "and AgentActivity.aclose() drains the tool executor before closing the models.",
               _tool_agent("park"), _reply_calls_tool),
    _HangClass("tool-swallow", "tool swallowing CancelledError",
               "A function tool catches CancelledError and keeps waiting: nothing can stop it, "
               "so a correct close abandons it.",
               _tool_agent("swallow"), _reply_calls_tool),
    _HangClass("tool-sleep", "tool running a long finite call (30 s)",
               "Even a tool that honours cancellation holds a forced close for its whole "
               "duration: the interrupt does not reach it.",
               _tool_agent("sleep:30"), _reply_calls_tool),
    _HangClass("on-exit-hang", "Agent.on_exit never returns",
               "drain() holds the activity lock while it awaits on_exit.",
               _hook_agent(on_exit="park"), _engage_on_exit),
    _HangClass("on-enter-hang", "Agent.on_enter never returns",
               "on_enter is a speech task without a SpeechHandle: interrupt() cannot stop it.",
               _hook_agent(on_enter="park"), None),
    _HangClass("agent-task-on-enter-hang", "AgentTask.on_enter never returns",
               "A tool awaits an AgentTask whose on_enter hangs; the close waits for the task "
               "to become inactive.",
               _agent_task, _reply_calls_tool),
    _HangClass("handoff-old-on-exit-hang", "old agent's on_exit hangs during a handoff",
               "A tool hands off; the old agent's on_exit never returns while the handoff holds "
               "the activity lock.",
               _handoff("park", None), _reply_calls_tool),
    _HangClass("handoff-new-on-enter-hang", "new agent's on_enter hangs after a handoff",
               "A tool hands off; the new agent's on_enter never returns.",
               _handoff(None, "park"), _reply_calls_tool),
    _HangClass("stt-close-hang", "STT stream aclose() hangs",
               "The recognize stream waits for a goodbye from the provider that never comes; "
               "vanilla waits forever inside AgentActivity.aclose().",
               _faulty_models(stt={"close_fault": "hang"}), _engage_now),
    _HangClass("tts-stall", "TTS stream that never ends and hangs on cancel",
               "The TTS stream accepts text, never produces audio, and waits for a provider "
               "goodbye when cancelled.",
               _faulty_models(tts={"stall": True, "close_fault": "hang"}), _reply_engaged_when_streaming),
    _HangClass("llm-stall", "LLM stream that stalls and hangs on cancel",
               "The LLM stream never answers and waits for a goodbye when cancelled.",
               _faulty_models(llm_stall=True, llm_fault="hang"), _reply_engaged_when_streaming),
    _HangClass("session-toolset-aclose-hang", "session Toolset (MCP-like) whose aclose() hangs",
               "AgentSession gathers toolset.aclose() without a bound.",
               _toolsets("session", hang_close=True), _engage_now),
    _HangClass("agent-toolset-aclose-hang", "agent Toolset whose aclose() hangs",
               "AgentActivity.aclose() gathers its agent's toolsets without a bound.",
               _toolsets("agent", hang_close=True), _engage_now),
    # before start() finished no model reports errors yet: no error path
    _HangClass("start-toolset-setup-hang", "closing while start() sets up a toolset that hangs",
               "start() holds the session lock across toolset setup; the close waits for it.",
               _toolsets("agent", hang_setup=True), None, paths=("aclose", "shutdown", "disconnect"),
               during_start=True),
    # aclose() and the error close never used the stale closing task: only these two paths bite
    _HangClass("restart", "a second close after the session was shut down and restarted",
               "Upstream never resets the finished closing task, so after a restart shutdown() "
               "and close-on-disconnect are no-ops and the session stays open.",
               _hook_agent(), _engage_now, paths=("shutdown", "disconnect"), restart=True),
)  # fmt: skip


def _scenarios() -> list[Scenario]:
    out = [
        Scenario(
            f"{hc.key}-{path}",
            hc.stuck,
            path,
            hc.description,
            hc.setup,
            hc.trigger,
            during_start=hc.during_start,
            restart=hc.restart,
            tags=("core",)
            if hc.key in ("tool-park", "tool-swallow", "on-exit-hang", "stt-close-hang")
            else (),
        )
        for hc in HANG_CLASSES
        for path in hc.paths
    ]
    out += [
        Scenario("tool-awaits-aclose", "tool that awaits session.aclose()", "aclose",
                 "An await cycle: the close waits for the tool, the tool waits for the close.",
                 _tool_agent("aclose"), _reply_calls_tool),
        Scenario("race-aclose-shutdown", "aclose() racing shutdown(drain=False), tool stuck", "aclose",
                 "Two forced closes at once must share one close and one close event.",
                 _tool_agent("park"), _reply_calls_tool, tags=("race",)),
        Scenario("escalate-graceful", "forced aclose() joining a graceful drain, tool stuck", "aclose",
                 "shutdown(drain=True) waits for the stuck tool forever; an aclose() that joins "
                 "it must bound it.",
                 _tool_agent("park"), _reply_calls_tool, tags=("escalate",)),
        # controls: must close fast with and without the layer
        Scenario("healthy-aclose", "nothing (control)", "aclose",
                 "A healthy session: both close promptly, nothing forced.",
                 _hook_agent(), _engage_now, vanilla_hangs=False, tags=("control",)),
        Scenario("graceful-slow-tool", "slow but finite tool, graceful drain (control)", "graceful",
                 "shutdown(drain=True) must still wait for a 1.5 s tool to finish.",
                 _tool_agent("sleep:1.5"), _reply_calls_tool, vanilla_hangs=False, tags=("control",)),
    ]  # fmt: skip
    return out


SCENARIOS: dict[str, Scenario] = {s.id: s for s in _scenarios()}


@dataclass
class Outcome:
    """What one run of a scenario observed."""

    scenario: str
    patched: bool
    closed: bool
    ms: float
    provider_open: int
    streams_open: int
    close_events: int
    tasks_left: int
    report: Any = None
    error: str = ""

    @property
    def clean(self) -> bool:
        return self.closed and self.provider_open == 0 and self.close_events == 1 and not self.error


async def _close(ctx: Ctx, sc: Scenario) -> None:
    s = ctx.session
    assert s is not None
    if sc.id == "race-aclose-shutdown":
        s.shutdown(drain=False)
        await s.aclose()
    elif sc.id == "escalate-graceful":
        s.shutdown(drain=True)
        await asyncio.sleep(0.05)
        await s.aclose()
    elif sc.path == "aclose":
        await s.aclose()
    elif sc.path in ("shutdown", "graceful"):
        s.shutdown(drain=sc.path == "graceful")
        await _closed_event(ctx)
    elif sc.path == "disconnect":
        # what room io does when the linked participant (a SIP caller) hangs up
        s._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
        await _closed_event(ctx)
    elif sc.path == "error":
        model = s.stt
        assert isinstance(model, stt.STT)
        err = stt.STTError(
            timestamp=time.time(), label="fake", error=RuntimeError("provider gone"), recoverable=False
        )
        for _ in range(s.conn_options.max_unrecoverable_errors + 1):
            model.emit("error", err)
        await _closed_event(ctx)


async def _closed_event(ctx: Ctx) -> None:
    """The end of the close a ``_close_soon`` path started: its close event, or (a session
    whose start() never finished emits none) its closing task; then that task's end. A
    closing task that was already done is a stale one (upstream never resets it)."""
    assert ctx.session is not None
    close = closing_of(ctx.session, live_only=False)
    task = close.task if close is not None else ctx.session._closing_task
    live = task is not None and not task.done()
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(ctx.extra["closed"].wait())}
    if live:
        assert task is not None
        waiters.add(task)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if live:
            assert task is not None
            await asyncio.wait({task})
    finally:
        for w in waiters:
            if w is not task:
                w.cancel()


def make_session(
    ctx: Ctx,
    vad: Any = None,
    *,
    session_cls: type[AgentSession[Any]] = AgentSession,
    transcript_timeout: float = TRANSCRIPT_TIMEOUT,
    **kwargs: Any,
) -> AgentSession[Any]:
    """A roomless session on the fakes (and the real Silero VAD), wired to ``ctx``."""
    session: AgentSession[Any] = session_cls(
        stt=FakeSTT(ctx.ledger, **ctx.stt_kwargs),
        llm=FakeLLM(ctx.ledger, ctx.script, close_fault=ctx.llm_close_fault),
        tts=FakeTTS(ctx.ledger, **ctx.tts_kwargs),
        tools=ctx.session_tools,
        vad=vad if vad is not None else load_vad(),
        session_close_transcript_timeout=transcript_timeout,
        **kwargs,
    )
    session.input.audio = SilenceInput()
    session.output.audio = FastAudioOutput()
    return session


_vad: Any = None


def load_vad() -> Any:
    """The real Silero VAD (its model ships in the wheel), loaded once per process."""
    global _vad
    if _vad is None:
        from livekit.plugins import silero

        _vad = silero.VAD.load()
    return _vad


async def run_scenario(
    scenario: Scenario | str,
    *,
    patched: bool,
    drain_timeout: float = 0.5,
    close_timeout: float = 3.0,
    limit: float | None = None,
) -> Outcome:
    """Run one scenario in the current event loop and report what happened.

    ``patched`` installs the layer for the run (and restores the previous state after);
    ``limit`` is how long to wait for the close before calling it hung (default: the
    close bound plus one second when patched, one second on vanilla).
    """
    import livekit_safeclose as lsc

    sc = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    layer = LayerForRun(patched, drain_timeout=drain_timeout, close_timeout=close_timeout)
    if limit is None:
        limit = close_timeout + 1.0 if patched or not sc.vanilla_hangs else 1.0
    before = set(asyncio.all_tasks())
    ctx = Ctx()
    ctx.extra["closed"] = asyncio.Event()
    closes: list[Any] = []
    closer: asyncio.Task[None] | None = None
    try:
        agent = await sc.setup(ctx)
        session = ctx.session = make_session(ctx)

        def _on_close(ev: Any) -> None:
            closes.append(ev)
            ctx.extra["closed"].set()

        session.on("close", _on_close)
        if sc.during_start:
            starter = asyncio.ensure_future(session.start(agent))
            await asyncio.wait_for(ctx.engaged.wait(), 5)
        else:
            await session.start(agent)
            starter = None
            if sc.restart:
                # closed through shutdown(): upstream never resets the closing task it sets
                session.shutdown(drain=False)
                await asyncio.wait_for(ctx.extra["closed"].wait(), 5)
                while session._closing_task is not None and not session._closing_task.done():
                    await asyncio.sleep(0.01)
                closes.clear()
                ctx.extra["closed"].clear()
                await session.start(agent)
            if sc.trigger is not None:
                await sc.trigger(ctx)
            await asyncio.wait_for(ctx.engaged.wait(), 5)
        await asyncio.sleep(0.05)

        t0 = time.monotonic()
        closer = asyncio.ensure_future(_close(ctx, sc))
        done, _ = await asyncio.wait({closer}, timeout=limit)
        ms = (time.monotonic() - t0) * 1000
        closed = bool(done) and closer.exception() is None if done else False
        err = ""
        if done and closer.exception() is not None:
            err = repr(closer.exception())
        if starter is not None:
            await asyncio.wait({starter}, timeout=0.5)
        await asyncio.sleep(0)
        return Outcome(
            scenario=sc.id,
            patched=patched,
            closed=closed,
            ms=round(ms, 1),
            provider_open=ctx.ledger.open_count(),
            streams_open=lsc.open_streams(session)["total"] if patched else -1,
            close_events=len(closes),
            tasks_left=len(tasks_since(before)),
            report=lsc.last_close_report(session) if patched else None,
            error=err,
        )
    finally:
        ctx.ledger.release()
        if closer is not None and not closer.done():
            closer.cancel()
        await cancel_since(before)
        layer.restore()
