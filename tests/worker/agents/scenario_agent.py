"""A livekit-agents worker whose shutdown behaviour is chosen by environment variables.

Run by the tests as ``python scenario_agent.py start --url ... --api-key ... --api-secret ...``.

SC_PATCHES       comma list of ``signal_guard`` / ``drain_availability``: the worker parts
                 ``livekit_safeclose.install()`` applies at import (the others off)
SC_HANDLER       which user SIGTERM handler to install, and where (see ``_install_handler``)
SC_REQUEST_BLOCK seconds the first ``request_fnc`` blocks the event loop (``time.sleep``)
SC_LATE_ACCEPT   seconds the second ``request_fnc`` awaits before accepting (a slow lookup)
SC_JOB_SECONDS   how long each job's entrypoint runs before ``ctx.shutdown()``
SC_IDLE          ``num_idle_processes``

The entrypoint never calls ``ctx.connect()``, so no room server is needed. Markers the tests
grep for are printed to stderr with ``SCMARK``.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from types import FrameType

from livekit.agents import AgentServer, JobContext, JobRequest, cli

PATCHES = {p for p in os.environ.get("SC_PATCHES", "").split(",") if p}
HANDLER = os.environ.get("SC_HANDLER", "none")
REQUEST_BLOCK = float(os.environ.get("SC_REQUEST_BLOCK", "0"))
LATE_ACCEPT = float(os.environ.get("SC_LATE_ACCEPT", "0"))
JOB_SECONDS = float(os.environ.get("SC_JOB_SECONDS", "2"))

if hasattr(signal, "SIGUSR2"):  # `kill -USR2 <pid>` dumps every thread's stack (diagnostics)
    import faulthandler

    faulthandler.register(signal.SIGUSR2, all_threads=True)

if PATCHES:
    import livekit_safeclose

    livekit_safeclose.install(
        signal_guard="signal_guard" in PATCHES,
        drain_availability="drain_availability" in PATCHES,
        bounded_drain_end=False,
    )


def mark(text: str) -> None:
    sys.stderr.write(f"SCMARK {time.monotonic():.3f} {os.getpid()} {text}\n")
    sys.stderr.flush()


def user_sigterm_handler(signum: int, frame: FrameType | None) -> None:
    mark(f"user_handler signum={signum}")


def user_raising_handler(signum: int, frame: FrameType | None) -> None:
    mark(f"user_handler_raising signum={signum}")
    sys.exit(0)


def user_loop_callback() -> None:
    mark("user_loop_callback")


_aiohttp_runner: object | None = None


async def _start_aiohttp_with_signals() -> None:
    """A health endpoint started the way aiohttp's docs show: its runner takes over SIGTERM."""
    global _aiohttp_runner
    from aiohttp import web

    app = web.Application()
    runner = web.AppRunner(app, handle_signals=True)
    await runner.setup()  # loop.add_signal_handler(SIGTERM, _raise_graceful_exit)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    _aiohttp_runner = runner
    mark("aiohttp_started")


def _install_handler(where: str) -> None:
    kind, _, place = HANDLER.rpartition("_")
    if place != where:
        return
    if kind == "signal":
        signal.signal(signal.SIGTERM, user_sigterm_handler)
    elif kind == "raise":
        signal.signal(signal.SIGTERM, user_raising_handler)
    elif kind == "loop":
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, user_loop_callback)
    elif kind == "aiohttp":
        asyncio.get_running_loop().create_task(_start_aiohttp_with_signals())
    else:
        raise ValueError(f"unknown SC_HANDLER {HANDLER!r}")
    mark(f"installed {HANDLER}")


server = AgentServer(
    num_idle_processes=int(os.environ.get("SC_IDLE", "1")),
    load_threshold=math.inf,  # only draining may make the worker full (no CPU-load flakes)
    load_fnc=lambda: 0.0,
    port=0,
    drain_timeout=60,
)

_requests = 0


async def on_request(req: JobRequest) -> None:
    global _requests
    _requests += 1
    mark(f"request {req.id}")
    _install_handler("request")
    if REQUEST_BLOCK and _requests == 1:
        time.sleep(REQUEST_BLOCK)  # deliberately blocks the worker's event loop
        mark(f"request_unblocked {req.id}")
    if LATE_ACCEPT and _requests == 2:
        await asyncio.sleep(LATE_ACCEPT)
    await req.accept()
    mark(f"accept_returned {req.id}")


@server.on("worker_started")
def _on_worker_started() -> None:
    _install_handler("started")


@server.rtc_session(on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    mark(f"job_start {ctx.job.id}")

    async def _on_shutdown(reason: str) -> None:
        mark(f"job_shutdown {ctx.job.id} reason={reason}")

    ctx.add_shutdown_callback(_on_shutdown)
    await asyncio.sleep(JOB_SECONDS)
    mark(f"job_end {ctx.job.id}")
    ctx.shutdown("job done")


if __name__ == "__main__":
    cli.run_app(server)
