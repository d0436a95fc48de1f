"""The agent of the end-to-end scenarios: one tool and one ``on_exit`` whose fault each
scenario picks, and the context through which the runner sees and releases it."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from livekit.agents import Agent, RunContext, function_tool

ToolMode = Literal["park", "linger", "ok"]
ExitMode = Literal["none", "park", "say", "reply"]


class E2EContext:
    """What the agent reports to the runner, and the switch that releases what it parked."""

    def __init__(self) -> None:
        self.tool_entered = asyncio.Event()
        self.exit_entered = asyncio.Event()
        self.release = asyncio.Event()


class E2EAgent(Agent):
    """``lookup`` parks until released (``tool="park"``), parks and is slow to unwind
    (``"linger"``: cancelled, it keeps running through the close's drain phase, as a cleanup
    that outlasts the drain bound would, and returns once the close moved on) or answers;
    ``on_exit`` parks, says a goodbye through the TTS (``"say"``) or asks the LLM for one
    (``"reply"``)."""

    def __init__(self, ctx: E2EContext, *, tool: ToolMode = "ok", on_exit: ExitMode = "none") -> None:
        super().__init__(instructions="You are a test agent. Use lookup when asked.")
        self._ctx, self._tool, self._exit = ctx, tool, on_exit

    @function_tool
    async def lookup(self, context: RunContext[Any]) -> str:
        """Look something up."""
        self._ctx.tool_entered.set()
        if self._tool == "park":
            await self._ctx.release.wait()
        elif self._tool == "linger":
            try:
                await self._ctx.release.wait()
            except asyncio.CancelledError:
                await self._linger()
                return "cancelled"
        return "found it"

    async def _linger(self) -> None:
        from ...bounded_close import closing_of

        while not self._ctx.release.is_set():
            close = closing_of(self.session, live_only=False)
            if close is None or close.phase != "drain":
                return
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    async def on_exit(self) -> None:
        self._ctx.exit_entered.set()
        if self._exit == "park":
            await self._ctx.release.wait()
        elif self._exit == "say":
            await self.session.say("Goodbye, talk to you soon.")
        elif self._exit == "reply":
            await self.session.generate_reply(instructions="Say goodbye.")
