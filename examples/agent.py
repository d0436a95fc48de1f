"""An agent entrypoint using livekit-safeclose: one line before the worker starts.

Run it like any livekit-agents worker (`python examples/agent.py start`). The booking tool
calls an API that may never answer; without the layer a caller hanging up mid-call leaves
the session (and its STT websocket) open forever. With it, the close is bounded.
"""

from __future__ import annotations

import asyncio

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, RunContext, cli, function_tool

import livekit_safeclose

livekit_safeclose.install(drain_timeout=5.0, close_timeout=10.0)


async def call_booking_api(party: int) -> str:
    await asyncio.sleep(3600)  # stands for an HTTP call without a timeout
    return f"table for {party}"


class BookingAgent(Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You book restaurant tables. Be brief.")

    @function_tool
    async def book_table(self, context: RunContext, party: int) -> str:
        """Book a table for `party` people."""
        return await call_booking_api(party)


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session: AgentSession = AgentSession(
        stt="deepgram/nova-3", llm="openai/gpt-4.1-mini", tts="cartesia/sonic-2"
    )
    await session.start(agent=BookingAgent(), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(server)
