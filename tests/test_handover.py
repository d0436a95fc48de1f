"""A close that lands inside an activity hand-over: what is in flight is still the session's.

Entering an ``AgentTask`` pauses the parent activity (``AgentActivity.pause``): upstream
detaches the parts the task's activity reuses (``_detach_reusable_resources``: the STT
pipeline, with its pump and provider stream), then closes the rest of the parent's session
(``_close_session``), and only then starts the task's activity, which takes the pipeline.
A close that begins in between finds the pipeline in neither activity; upstream's
``_update_activity`` then sees the session closing and closes the pipeline itself, outside
the close (fuzz seed 1 #6487, a race the replay hit about once in 30).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import utils, vad

from livekit_safeclose.stacks import task_name
from livekit_safeclose.testing._runs import LayerForRun, cancel_since, close_ended, tasks_since
from livekit_safeclose.testing.fakes import FakeReply
from livekit_safeclose.testing.scenarios import Ctx, ScenarioAgent, StuckTask, make_session
from livekit_safeclose.testing.scenarios.runner import load_vad


class GatedVAD(vad.VAD):
    """The real Silero VAD behind a gate: while ``armed``, a stream's close sets ``parked``
    and waits for ``gate``. The parent activity closes its VAD stream inside ``pause``,
    right after the detach, so the gate holds the hand-over exactly where the detached
    pipeline is held by no activity."""

    def __init__(self, inner: vad.VAD) -> None:
        super().__init__(capabilities=inner.capabilities)
        self.inner = inner
        self.armed = False
        self.parked = asyncio.Event()
        self.gate = asyncio.Event()

    def stream(self) -> vad.VADStream:
        return _GatedVADStream(self, self.inner.stream())


class _GatedVADStream(vad.VADStream):
    def __init__(self, owner: GatedVAD, inner: vad.VADStream) -> None:
        self._owner, self._inner = owner, inner
        super().__init__(owner)

    async def _main_task(self) -> None:
        async def forward() -> None:
            async for item in self._input_ch:
                if isinstance(item, vad.VADStream._FlushSentinel):
                    self._inner.flush()
                else:
                    self._inner.push_frame(item)

        forwarding = asyncio.create_task(forward())
        try:
            async for ev in self._inner:
                self._event_ch.send_nowait(ev)
        finally:
            await utils.aio.cancel_and_wait(forwarding)

    async def aclose(self) -> None:
        if self._owner.armed:
            self._owner.parked.set()
            await self._owner.gate.wait()
        await self._inner.aclose()
        await super().aclose()


async def _until(cond: Any, timeout: float) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("patched", [True, False], ids=["layer", "vanilla"])
async def test_a_close_during_the_agent_task_hand_over_closes_the_detached_stt_stream(patched: bool) -> None:
    """The close begins while ``pause`` holds the detached pipeline (gated in the parent's
    ``_close_session``); upstream's hand-over then closes the pipeline itself and the STT
    stream's close hangs (``stt_close="hang"``). Vanilla leaves the stream open (and its
    close hangs); the layer stops it only because the ``_detach_reusable_resources`` row
    notes the detached pipeline as the session's: without that row the stream, its pump and
    its metrics task outlive the close, as in fuzz #6487."""
    from livekit.agents.voice.agent_activity import AgentActivity

    if not hasattr(AgentActivity, "_detach_reusable_resources"):
        pytest.skip("this release hands no STT pipeline to an AgentTask's activity")
    before = set(asyncio.all_tasks())
    layer = LayerForRun(patched, drain_timeout=0.3, close_timeout=1.5)
    ctx = Ctx()
    ctx.stt_kwargs = {"close_fault": "hang"}
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    gated = GatedVAD(load_vad())
    session = make_session(ctx, vad=gated, transcript_timeout=0.05)
    closing: asyncio.Task[None] | None = None
    try:
        await session.start(ScenarioAgent(ctx, task=lambda: StuckTask(ctx)))
        assert await _until(lambda: ctx.ledger.open_count("stt") == 1, 2.0), "no STT stream opened"
        gated.armed = True
        session.generate_reply(user_input="look it up")
        await asyncio.wait_for(gated.parked.wait(), 2.0)
        closing = asyncio.ensure_future(session.aclose())
        assert await _until(lambda: session._closing, 1.0), "the close never began"
        gated.gate.set()
        await asyncio.wait({closing}, timeout=3.0 if patched else 1.0)
        if patched:
            assert closing.done(), "the layer's close did not return"
            await close_ended(session)
        await asyncio.sleep(0.05)
        stt_open = ctx.ledger.open_count("stt")
        if patched:
            left = [task_name(t) for t in tasks_since(before)]
            assert (stt_open, left) == (0, []), f"stt open: {stt_open}, tasks left: {left}"
        else:
            # vanilla shows the bug: the stream whose close hangs stays open at the provider
            assert stt_open == 1, f"vanilla closed the detached stream (close done: {closing.done()})"
    finally:
        gated.gate.set()
        ctx.ledger.release()
        if closing is not None:
            closing.cancel()
        for _ in range(2):  # a hung stream close ends on a second cancellation
            for stream in session.stt.streams:  # type: ignore[union-attr]
                stream._task.cancel()
            await asyncio.sleep(0.01)
        await cancel_since(before)
        layer.restore()
