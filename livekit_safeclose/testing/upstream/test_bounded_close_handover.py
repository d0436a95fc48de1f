"""A close that begins inside an ``AgentTask``'s hand-over: entering the task pauses the
parent activity, which detaches the STT pipeline for the task's activity and then closes the
rest of its own session; a close that begins in between finds the pipeline in neither
activity, and the hand-over, seeing the session closing, closes it outside the close. Here
the parent's VAD stream close (inside that pause, after the detach) is held until the close
has begun. Without ``voice/_bounded_close.py`` the STT stream whose close hangs stays open."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import Agent, AgentTask, RunContext, function_tool, vad
from test_bounded_close import _assert_closed, _short_bounds, _start

pytestmark = pytest.mark.asyncio
__all__ = ["_short_bounds"]  # the bounds fixture, shared with test_bounded_close


class GatedVAD(vad.VAD):
    """A VAD that hears nothing; while ``armed``, a stream's close waits for ``gate``."""

    def __init__(self) -> None:
        super().__init__(capabilities=vad.VADCapabilities(update_interval=0.032))
        self.armed = False
        self.parked, self.gate = asyncio.Event(), asyncio.Event()

    def stream(self) -> vad.VADStream:
        return GatedVADStream(self)


class GatedVADStream(vad.VADStream):
    async def _main_task(self) -> None:
        async for _ in self._input_ch:
            pass

    async def aclose(self) -> None:
        gated = self._vad
        if isinstance(gated, GatedVAD) and gated.armed:
            gated.parked.set()
            await gated.gate.wait()
        await super().aclose()


class StuckTask(AgentTask[None]):
    def __init__(self) -> None:
        super().__init__(instructions="A task whose on_enter never returns.")

    async def on_enter(self) -> None:
        await asyncio.Event().wait()


class TaskParent(Agent):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(instructions="You are a helpful assistant.", **kwargs)

    @function_tool
    async def lookup(self, context: RunContext[Any]) -> str:
        """Look something up."""
        await StuckTask()
        return "done"


async def test_aclose_inside_agent_task_hand_over_stops_the_detached_stt_stream() -> None:
    gated = GatedVAD()
    run = await _start(TaskParent(vad=gated), stt_fault="hang", tool_call=True)
    while run.provider.open != 1:
        await asyncio.sleep(0.01)
    gated.armed = True
    run.session.generate_reply(user_input="look it up")
    await asyncio.wait_for(gated.parked.wait(), 5)
    close = asyncio.ensure_future(run.session.aclose())
    try:
        await asyncio.wait_for(_until_closing(run.session), 5)
        gated.gate.set()
        await _assert_closed(run, close)
    finally:
        gated.gate.set()
        close.cancel()


async def _until_closing(session: Any) -> None:
    while not session._closing:
        await asyncio.sleep(0.01)
