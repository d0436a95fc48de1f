"""A worker whose jobs end by themselves (``ctx.shutdown()`` after a real AgentSession started
and closed) and then hang in one teardown step, chosen by the job's room name.

Run by the tests as ``python teardown_agent.py start --url ...``.

SC_LAYER   "1": ``livekit_safeclose.install(drain_timeout=SC_DRAIN, close_timeout=SC_CLOSE,
           graceful_timeout=SC_GRACEFUL)``
           at import (in the worker and every job process); "" = vanilla livekit-agents

Room names (prefix):
``healthy``           nothing hangs (the control: how long a teardown takes here)
``hang-callback``     two shutdown callbacks: one never returns, the other finishes after 0.2 s
``raise-callback``    two shutdown callbacks: one raises at once, the other finishes after 0.9 s
``hang-disconnect``   ``room.disconnect()`` never returns (an RPC handler that never answers
                      holds it in the real SDK)
``hang-session-end``  ``JobContext._on_session_end()`` never returns (a recorder close or a
                      report upload that never answers)
``hang-exit``         a non-daemon thread outlives the job: the process never exits
``end-call``          the agent's EndCallTool says goodbye into a dead audio sink (never plays
                      out); the LLM is scripted to call ``end_call``

The faults are injected by replacing the upstream callable *before* ``install()``, so the
layer wraps them as it would wrap a real hang. The entrypoint never calls ``ctx.connect()``.
Markers go to stderr with ``SCMARK``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobRequest, cli
from livekit.agents.job import JobContext as _JobContext

from livekit_safeclose.testing.fakes import (
    DeadAudioOutput,
    FakeLLM,
    FakeReply,
    FakeSTT,
    FakeTTS,
    FastAudioOutput,
    ProviderLedger,
    SilenceInput,
)

LAYER = os.environ.get("SC_LAYER", "") == "1"


def mark(text: str) -> None:
    sys.stderr.write(f"SCMARK {time.monotonic():.3f} {os.getpid()} {text}\n")
    sys.stderr.flush()


_disconnect = rtc.Room.disconnect
_session_end = _JobContext._on_session_end


async def _hanging_disconnect(self: rtc.Room, **kwargs: Any) -> None:
    if self.name.startswith("hang-disconnect"):
        mark(f"disconnect_hangs {self.name}")
        await asyncio.Event().wait()
    await _disconnect(self, **kwargs)


async def _hanging_session_end(self: _JobContext) -> None:
    if self.job.room.name.startswith("hang-session-end"):
        mark(f"session_end_hangs {self.job.room.name}")
        await asyncio.Event().wait()
    await _session_end(self)


rtc.Room.disconnect = _hanging_disconnect  # type: ignore[method-assign]
_JobContext._on_session_end = _hanging_session_end  # type: ignore[method-assign]

if LAYER:
    import livekit_safeclose

    livekit_safeclose.install(
        drain_timeout=float(os.environ.get("SC_DRAIN", "0.3")),
        close_timeout=float(os.environ.get("SC_CLOSE", "1.0")),
        graceful_timeout=float(os.environ.get("SC_GRACEFUL", "1.0")),
        bounded_teardown=os.environ.get("SC_TEARDOWN", "1") == "1",
    )

server = AgentServer(num_idle_processes=0, load_threshold=float("inf"), load_fnc=lambda: 0.0, port=0)


async def on_request(req: JobRequest) -> None:
    await req.accept()


def _add_callbacks(ctx: JobContext, room: str) -> None:
    async def _marker(reason: str) -> None:
        mark(f"job_shutdown {room} reason={reason}")

    ctx.add_shutdown_callback(_marker)
    if room.startswith("raise-callback"):

        async def raising_callback() -> None:
            raise RuntimeError("a shutdown callback that fails")

        async def slower_callback() -> None:
            await asyncio.sleep(0.9)
            mark(f"callback_done {room}")

        ctx.add_shutdown_callback(raising_callback)
        ctx.add_shutdown_callback(slower_callback)
    if not room.startswith("hang-callback"):
        return

    async def hung_callback() -> None:
        mark(f"callback_hangs {room}")
        await asyncio.Event().wait()

    async def slow_callback() -> None:
        await asyncio.sleep(0.2)
        mark(f"callback_done {room}")

    ctx.add_shutdown_callback(hung_callback)
    ctx.add_shutdown_callback(slow_callback)


def _session(room: str) -> AgentSession[Any]:
    ledger = ProviderLedger()
    script = [FakeReply(tool_calls=[("end_call", {})])] if room.startswith("end-call") else []
    session: AgentSession[Any] = AgentSession(
        stt=FakeSTT(ledger),
        llm=FakeLLM(ledger, script),
        tts=FakeTTS(ledger),
        session_close_transcript_timeout=0.1,
    )
    session.input.audio = SilenceInput()
    session.output.audio = DeadAudioOutput() if room.startswith("end-call") else FastAudioOutput()
    session.on("close", lambda ev: mark(f"session_closed {room}"))
    return session


@server.rtc_session(on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    room = ctx.job.room.name
    mark(f"job_start {room}")
    _add_callbacks(ctx, room)
    session = _session(room)
    if room.startswith("end-call"):
        from livekit.agents.beta.tools import EndCallTool

        agent = Agent(instructions="test", tools=[EndCallTool()])
        await session.start(agent)
        mark(f"session_started {room}")
        session.generate_reply(user_input="bye")
        return  # the EndCallTool ends the job (ctx.shutdown() once the session closed)
    await session.start(Agent(instructions="test"))
    mark(f"session_started {room}")
    if room.startswith("hang-exit"):
        threading.Thread(target=threading.Event().wait, name="left-running", daemon=False).start()
    await asyncio.sleep(0.3)
    mark(f"job_end {room}")
    ctx.shutdown("job done")


if __name__ == "__main__":
    cli.run_app(server)
