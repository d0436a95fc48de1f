"""The scenario catalogue: every known way a session close hangs, plus healthy controls.

A hang class names one fault and how to engage it; it expands into one scenario per close
path it bites on, so a new fault is covered along every path at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from livekit.agents import Agent

from ..fakes import FakeReply
from ..fuzz.schedule import Schedule
from .agents import Ctx, HangingToolset, ScenarioAgent, StuckTask
from .fuzz_found import FUZZ_FOUND, path_of

ClosePath = Literal["aclose", "shutdown", "disconnect", "error", "graceful"]
CLOSE_PATHS: tuple[ClosePath, ...] = ("aclose", "shutdown", "disconnect", "error")


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
    #: vanilla closes in time but leaves tasks behind (the bug is the leak, not a hang)
    vanilla_leaks: bool = False
    #: a close must end within drain bound (True) or may use the full close bound
    drain_only: bool = False
    #: the stream can't be closed by anyone (swallows every cancellation)
    zombie_stream: bool = False
    #: the session is closed once, restarted, then closed along ``path``
    restart: bool = False
    #: start() is still running when the close begins
    during_start: bool = False
    #: a task of the scenario's own outlives the close on purpose (a tool that swallows
    #: cancellation, a tool that resumes after the close it awaited)
    leaves_task: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)
    #: a regression the fuzzer found: this schedule is replayed step by step (setup,
    #: trigger and path only describe it) and every fuzz invariant is checked
    schedule: Schedule | None = None
    #: features of livekit-agents the scenario needs (:data:`..features.FEATURES`): on a
    #: release without one it is "n/a" with the reason, never run
    requires: tuple[str, ...] = ()

    def not_applicable(self) -> str | None:
        """Why the scenario cannot run on the installed release, ``None`` when it can."""
        from ..features import lacking

        return lacking(self.requires)


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


def _dead_sink(tool: str | None = None) -> Setup:
    """The caller has hung up: the sink never reports playout. With ``tool``, the reply
    says something *and* calls the tool."""

    async def setup(ctx: Ctx) -> Agent:
        ctx.dead_sink = True
        if tool is not None:
            ctx.script = [FakeReply(text="Let me check that for you.", tool_calls=[("lookup", {})])]
        return ScenarioAgent(ctx, tool=tool or "park")

    return setup


async def _say_goodbye(ctx: Ctx) -> None:
    """A goodbye into the dead sink: engaged once the sink took its first frames."""
    assert ctx.session is not None
    ctx.session.say("Thanks for calling, goodbye.")
    sink = ctx.session.output.audio
    for _ in range(300):
        if getattr(sink, "frames", 0):
            break
        await asyncio.sleep(0.01)
    ctx.engaged.set()


async def _end_call_dead_sink(ctx: Ctx) -> Agent:
    """An agent with upstream's EndCallTool, scripted to call it, speaking into a dead sink,
    inside upstream's fake job context (the tool ends the job once the session closed)."""
    from livekit.agents.beta.tools import EndCallTool
    from livekit.agents.testing import fake_job_context

    job = fake_job_context()
    job.__enter__()
    ctx.extra.setdefault("undo", []).append(lambda: job.__exit__(None, None, None))
    ctx.dead_sink = True
    ctx.script = [FakeReply(text="Goodbye, thanks for calling.", tool_calls=[("end_call", {})])]

    async def _called(_: Any) -> None:
        ctx.engaged.set()

    return Agent(instructions="test", tools=[EndCallTool(delete_room=False, on_tool_called=_called)])


async def _background_audio(ctx: Ctx) -> None:
    """A BackgroundAudioPlayer with a looped ambient clip, tied to the session (upstream's
    console-mode room: nothing is published); engaged once it plays."""
    from livekit.agents.ipc.mock_room import create_mock_room
    from livekit.agents.voice.background_audio import BackgroundAudioPlayer, BuiltinAudioClip

    assert ctx.session is not None
    player = BackgroundAudioPlayer(ambient_sound=BuiltinAudioClip.OFFICE_AMBIENCE)
    await player.start(room=create_mock_room(), agent_session=ctx.session)
    ctx.extra["player"] = player
    await asyncio.sleep(0.2)
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
    requires: tuple[str, ...] = ()


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
               _toolsets("session", hang_close=True), _engage_now, requires=("toolset_lifecycle",)),
    _HangClass("agent-toolset-aclose-hang", "agent Toolset whose aclose() hangs",
               "AgentActivity.aclose() gathers its agent's toolsets without a bound.",
               _toolsets("agent", hang_close=True), _engage_now, requires=("toolset_lifecycle",)),
    # before start() finished no model reports errors yet: no error path
    _HangClass("start-toolset-setup-hang", "closing while start() sets up a toolset that hangs",
               "start() holds the session lock across toolset setup; the close waits for it.",
               _toolsets("agent", hang_setup=True), None, paths=("aclose", "shutdown", "disconnect"),
               during_start=True, requires=("toolset_lifecycle",)),
    _HangClass("dead-sink", "a reply into a caller who already hung up (the sink never plays out)",
               "The audio sink takes the goodbye's frames but never reports playout "
               "(livekit/agents#5497, #5359): a forced close waits for the interruption "
               "timeout and leaves an AudioOutput.wait_for_playout task behind.",
               _dead_sink(), _say_goodbye),
    _HangClass("tool-waits-playout", "tool awaiting ctx.wait_for_playout() into a dead sink",
               "The reply speaks and calls a tool that waits for that speech to play out, which "
               "a dead sink never does.",
               _dead_sink("playout"), _reply_calls_tool),
    # aclose() and the error close never used the stale closing task: only these two paths bite
    _HangClass("restart", "a second close after the session was shut down and restarted",
               "Upstream never resets the finished closing task, so after a restart shutdown() "
               "and close-on-disconnect are no-ops and the session stays open.",
               _hook_agent(), _engage_now, paths=("shutdown", "disconnect"), restart=True),
)  # fmt: skip


async def _replayed(ctx: Ctx) -> Agent:
    raise NotImplementedError("a fuzz scenario is replayed from its schedule")


def _fuzz_scenarios() -> list[Scenario]:
    return [
        Scenario(f.id, f.stuck, path_of(f.schedule), f.description or f.stuck, _replayed,
                 vanilla_hangs=f.vanilla_hangs, vanilla_leaks=f.vanilla_leaks, tags=("fuzz",),
                 schedule=f.schedule)
        for f in FUZZ_FOUND
    ]  # fmt: skip


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
            requires=hc.requires,
            leaves_task=hc.key == "tool-swallow",
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
                 _tool_agent("aclose"), _reply_calls_tool, leaves_task=True),
        Scenario("dead-sink-graceful", "graceful goodbye into a caller who already hung up", "graceful",
                 "shutdown(drain=True) waits for the goodbye's playout, which a dead sink never "
                 "reports: the close event never comes. With the layer it escalates at "
                 "graceful_timeout.",
                 _dead_sink(), _say_goodbye, tags=("graceful",)),
        Scenario("end-call-dead-sink", "EndCallTool whose goodbye goes into a caller who hung up",
                 "graceful",
                 "The LLM calls upstream's EndCallTool; the tool shuts the session down only once "
                 "the goodbye played out, which a dead sink never reports: the session and the "
                 "job never end. With the layer the goodbye gets graceful_timeout, then the "
                 "close is forced.",
                 _end_call_dead_sink, _reply_calls_tool, tags=("graceful",),
                 requires=("end_call_tool",)),
        Scenario("race-aclose-shutdown", "aclose() racing shutdown(drain=False), tool stuck", "aclose",
                 "Two forced closes at once must share one close and one close event.",
                 _tool_agent("park"), _reply_calls_tool, tags=("race",)),
        Scenario("escalate-graceful", "forced aclose() joining a graceful drain, tool stuck", "aclose",
                 "shutdown(drain=True) waits for the stuck tool forever; an aclose() that joins "
                 "it must bound it.",
                 _tool_agent("park"), _reply_calls_tool, tags=("escalate",)),
        Scenario("background-audio-aclose", "BackgroundAudioPlayer started with the session",
                 "aclose",
                 "The player's mixer and its looped ambient sound keep running after the "
                 "session closed: nothing closes a player started with agent_session=.",
                 _hook_agent(), _background_audio, vanilla_hangs=False, vanilla_leaks=True,
                 tags=("leak",)),
        # controls: must close fast with and without the layer
        Scenario("healthy-aclose", "nothing (control)", "aclose",
                 "A healthy session: both close promptly, nothing forced.",
                 _hook_agent(), _engage_now, vanilla_hangs=False, tags=("control",)),
        Scenario("graceful-slow-tool", "slow but finite tool, graceful drain (control)", "graceful",
                 "shutdown(drain=True) must still wait for a 1.5 s tool to finish.",
                 _tool_agent("sleep:1.5"), _reply_calls_tool, vanilla_hangs=False, tags=("control",)),
    ]  # fmt: skip
    return out + _fuzz_scenarios()


SCENARIOS: dict[str, Scenario] = {s.id: s for s in _scenarios()}
