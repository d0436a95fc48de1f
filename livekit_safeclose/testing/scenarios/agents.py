"""The agent side of the scenarios: where a stuck tool or hook parks, and the agent, task
and toolset that carry each fault into a real ``AgentSession``.

Kept apart from the catalogue so tests can build their own flows from the same parts
(``Ctx``, ``ScenarioAgent``). The file name keeps ``scenarios.py`` at its end on purpose:
close reports name the file a stuck tool is parked in, and tests match on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from livekit.agents import Agent, AgentSession, AgentTask, RunContext, function_tool, llm

from ..fakes import FakeReply, ProviderLedger


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
        #: the session speaks into a sink that never reports playout (a caller who hung up)
        self.dead_sink = False
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
        if self._tool == "playout":
            # waits until the words spoken with the tool call have played out
            self._ctx.engaged.set()
            await context.wait_for_playout()
            self._ctx.tool_finished.set()
            return "played"
        await self._ctx.park(self._tool)
        self._ctx.tool_finished.set()
        return "found it"


class StuckTask(AgentTask[None]):
    """An ``AgentTask`` a tool awaits, stuck in its ``on_enter``: the close must not wait for it."""

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
