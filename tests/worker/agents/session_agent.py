"""A worker whose jobs run a real AgentSession (real inference STT/TTS, OpenAI LLM plugins)
against a stand-in provider server, chosen by environment variables.

Run by the tests as ``python session_agent.py start --url ... --drain-timeout N ...``.

SC_LAYER          "1": ``livekit_safeclose.install()`` at import (so in the worker and in every
                  job process); "" = vanilla livekit-agents
SC_DRAIN, SC_CLOSE the layer's drain_timeout / close_timeout
SC_SECOND_CLOSE   "1": ``install(force_close_on_second_signal=True)``
SC_PROVIDER       the stand-in's base URL (http://127.0.0.1:PORT)
SC_MODE           "stuck_tool": the job asks the LLM (scripted by the test to call ``lookup``)
                  and the tool parks forever; the entrypoint returns, the session lives on.
                  "healthy": the session idles for SC_JOB_SECONDS, then ``ctx.shutdown()``.
                  "stuck_tool_aclose": the same, then the entrypoint force-closes the session
                  (``session.aclose()``) and the job lives on SC_JOB_SECONDS.
SC_IDLE           num_idle_processes
SC_PROM_DIR       when set, the worker serves livekit-agents' ``/metrics`` on 127.0.0.1
                  (``prometheus_port=0``, the port is logged) in multiprocess mode over this
                  directory (``prometheus_multiproc_dir``)

A job request for a room named ``idle-report*`` is refused after printing
``aidle_report(server)`` as a marker. The entrypoint never calls ``ctx.connect()`` (no room
server). Markers go to stderr with ``SCMARK``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import time
from typing import Any

from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobRequest,
    RunContext,
    cli,
    function_tool,
    inference,
)
from livekit.agents.voice.agent_session import SessionConnectOptions
from livekit.plugins import openai

from livekit_safeclose.testing.e2e import E2E_CONN_OPTIONS, ScriptedAudioInput
from livekit_safeclose.testing.fakes import FastAudioOutput
from livekit_safeclose.testing.standins.providers import (
    DEFAULT_API_KEY,
    DEFAULT_API_SECRET,
    DEFAULT_PROVIDER_KEY,
)

LAYER = os.environ.get("SC_LAYER", "") == "1"
MODE = os.environ.get("SC_MODE", "healthy")
PROVIDER = os.environ.get("SC_PROVIDER", "http://127.0.0.1:1")
JOB_SECONDS = float(os.environ.get("SC_JOB_SECONDS", "2"))
CLOSE_TIMEOUT = float(os.environ.get("SC_CLOSE", "4"))
DRAIN_TIMEOUT = float(os.environ.get("SC_DRAIN", "1"))

if hasattr(signal, "SIGUSR2"):
    import faulthandler

    faulthandler.register(signal.SIGUSR2, all_threads=True)

from livekit_safeclose import worker as safeclose_worker  # noqa: E402

if LAYER:
    import livekit_safeclose

    livekit_safeclose.install(
        drain_timeout=DRAIN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        force_close_on_second_signal=os.environ.get("SC_SECOND_CLOSE", "") == "1",
    )


def mark(text: str) -> None:
    sys.stderr.write(f"SCMARK {time.monotonic():.3f} {os.getpid()} {text}\n")
    sys.stderr.flush()


class StuckAgent(Agent):
    def __init__(self, job_id: str) -> None:
        super().__init__(instructions="You are a test agent. Use lookup when asked.")
        self.job_id = job_id
        self.tool_entered = asyncio.Event()

    @function_tool
    async def lookup(self, context: RunContext[Any]) -> str:
        """Look something up."""
        self.tool_entered.set()
        mark(f"tool_parked {self.job_id}")
        try:
            await asyncio.Event().wait()  # a backend call that never answers
        except asyncio.CancelledError:
            mark(f"tool_cancelled {self.job_id}")
            raise
        return "found it"


PROM_DIR = os.environ.get("SC_PROM_DIR", "")
server = AgentServer(
    num_idle_processes=int(os.environ.get("SC_IDLE", "1")),
    load_threshold=math.inf,
    load_fnc=lambda: 0.0,
    port=0,
    **({"host": "127.0.0.1", "prometheus_port": 0, "prometheus_multiproc_dir": PROM_DIR} if PROM_DIR else {}),
)


async def on_request(req: JobRequest) -> None:
    if req.room.name.startswith("idle-report"):
        report = await safeclose_worker.aidle_report(server, interval=0.3)
        mark("idle_report " + json.dumps(report.to_dict()))
        sys.stderr.write(report.summary() + "\n")
        await req.reject()
        return
    await req.accept()


@server.rtc_session(on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    job_id = ctx.job.id
    mark(f"job_start {job_id}")

    async def _on_shutdown(reason: str) -> None:
        mark(f"job_shutdown {job_id} reason={reason}")

    ctx.add_shutdown_callback(_on_shutdown)
    creds = {"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}
    session: AgentSession[Any] = AgentSession(
        stt=inference.STT(model="deepgram/nova-3", base_url=f"{PROVIDER}/v1", **creds),
        llm=openai.LLM(model="gpt-4o-mini", base_url=f"{PROVIDER}/v1", api_key=DEFAULT_PROVIDER_KEY),
        tts=inference.TTS(model="cartesia/sonic-3", base_url=f"{PROVIDER}/v1", **creds),
        session_close_transcript_timeout=0.3,
        conn_options=SessionConnectOptions(
            stt_conn_options=E2E_CONN_OPTIONS,
            llm_conn_options=E2E_CONN_OPTIONS,
            tts_conn_options=E2E_CONN_OPTIONS,
        ),
    )
    session.input.audio = ScriptedAudioInput("silence")
    session.output.audio = FastAudioOutput()
    session.on("close", lambda ev: mark(f"session_closed {job_id}"))
    agent = StuckAgent(job_id)
    await session.start(agent)
    mark(f"session_started {job_id}")

    if MODE in ("stuck_tool", "stuck_tool_aclose"):
        session.generate_reply(user_input="please look it up")
        await asyncio.wait_for(agent.tool_entered.wait(), 10)
        if MODE == "stuck_tool":
            return  # like most entrypoints: the session lives on after it returns
        await session.aclose()
        mark(f"session_aclosed {job_id}")

    await asyncio.sleep(JOB_SECONDS)
    mark(f"job_end {job_id}")
    ctx.shutdown("job done")


if __name__ == "__main__":
    cli.run_app(server)
