"""A stand-in for LiveKit's agent-dispatch server, for driving real worker processes in tests.

A livekit-agents worker started with ``--url ws://127.0.0.1:PORT`` opens a websocket to
``ws://127.0.0.1:PORT/agent`` (``AgentServer._connection_task`` joins ``"agent"`` onto the URL)
with an ``Authorization: Bearer <jwt>`` header and speaks ``livekit.protocol.agent``
``WorkerMessage`` / ``ServerMessage`` protobufs. This server answers the registration, lets a
test offer jobs (``AvailabilityRequest`` -> ``AvailabilityResponse`` -> ``JobAssignment``),
terminate them, and records every status the worker reports. It needs no room server: the
assignment carries a syntactically valid token for a room nobody hosts, which is fine as long as
the job's entrypoint never calls ``ctx.connect()``.

The server runs aiohttp on its own event loop in a daemon thread, so a synchronous test (or an
async test whose loop is busy) can use it through the blocking, thread-safe methods below.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import WSMsgType, web
from livekit import api
from livekit.protocol import agent, models

from .dispatch_records import (
    WORKER_STATUS_NAMES,
    JobOfferResult,
    JobStatusUpdate,
    WorkerConnection,
    WorkerStatusUpdate,
)

__all__ = ["DispatchServer", "JobOfferResult", "JobStatusUpdate", "WorkerConnection", "WorkerStatusUpdate"]

_T = TypeVar("_T")


class DispatchServer:
    """Stand-in agent-dispatch server on 127.0.0.1 (port 0 by default).

    Use as a context manager or call :meth:`start` / :meth:`stop`. All public methods are
    blocking and safe to call from any thread other than the server's own. ``api_key`` and
    ``api_secret`` only sign the job tokens handed out in assignments; workers are accepted
    whatever credentials they present (their ``Authorization`` header is recorded).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "devkey",
        api_secret: str = "safeclose-dispatch-secret-0123456789",  # >= 32 bytes for PyJWT
    ) -> None:
        self._host = host
        self._req_port = port
        self._api_key = api_key
        self._api_secret = api_secret
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._cond = threading.Condition()
        self._workers: dict[str, WorkerConnection] = {}
        self._worker_status: list[WorkerStatusUpdate] = []
        self._job_status: list[JobStatusUpdate] = []
        self._messages: list[tuple[float, str, agent.WorkerMessage]] = []
        self._pending_offers: dict[str, asyncio.Future[agent.AvailabilityResponse]] = {}
        self._availability: dict[str, agent.AvailabilityResponse] = {}
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DispatchServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """What to pass to the worker as ``--url``."""
        return f"ws://{self._host}:{self._port}"

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError("dispatch server already started")
        started = threading.Event()
        errors: list[BaseException] = []

        def _run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as e:  # surface bind errors to start()
                errors.append(e)
            started.set()
            try:
                if not errors:
                    loop.run_forever()
                    loop.run_until_complete(self._astop())
            finally:
                loop.close()

        self._thread = threading.Thread(target=_run, name="safeclose-dispatch", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("dispatch server did not start")
        if errors:
            raise RuntimeError("dispatch server failed to start") from errors[0]

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    async def _astart(self) -> None:
        app = web.Application()
        app.router.add_get("/agent", self._handle_worker)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._req_port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def _astop(self) -> None:
        for conn in list(self._workers.values()):
            if conn.ws is not None and not conn.ws.closed:
                await conn.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _call(self, coro_fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``coro_fn()`` on the server loop and wait for its result."""
        if self._loop is None:
            raise RuntimeError("dispatch server not started")
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking DispatchServer API called from the server thread")
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    # -- websocket side --------------------------------------------------------------------

    async def _handle_worker(self, request: web.Request) -> web.WebSocketResponse:
        # accept any credentials: the worker signs with whatever --api-key/--api-secret it got
        auth = request.headers.get("Authorization", "")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)

        first = await ws.receive()
        if first.type != WSMsgType.BINARY:
            await ws.close()
            return ws
        reg_msg = agent.WorkerMessage.FromString(first.data)
        if reg_msg.WhichOneof("message") != "register":
            await ws.close()
            return ws

        worker_id = f"AW_{next(self._ids)}"
        resp = agent.ServerMessage()
        resp.register.worker_id = worker_id
        resp.register.server_info.CopyFrom(
            models.ServerInfo(version="safeclose-dispatch", region="local", protocol=1)
        )
        await ws.send_bytes(resp.SerializeToString())

        conn = WorkerConnection(
            worker_id=worker_id,
            agent_name=reg_msg.register.agent_name,
            version=reg_msg.register.version,
            auth_header=auth,
            registered_at=time.monotonic(),
            ws=ws,
        )
        with self._cond:
            self._workers[worker_id] = conn
            self._messages.append((time.monotonic(), worker_id, reg_msg))
            self._cond.notify_all()

        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                await self._on_worker_message(conn, agent.WorkerMessage.FromString(msg.data))
        finally:
            with self._cond:
                conn.disconnected_at = time.monotonic()
                self._cond.notify_all()
        return ws

    async def _on_worker_message(self, conn: WorkerConnection, msg: agent.WorkerMessage) -> None:
        now = time.monotonic()
        which = msg.WhichOneof("message")
        with self._cond:
            self._messages.append((now, conn.worker_id, msg))
            if which == "update_worker":
                u = msg.update_worker
                self._worker_status.append(
                    WorkerStatusUpdate(
                        worker_id=conn.worker_id,
                        status=WORKER_STATUS_NAMES.get(u.status, str(u.status)),
                        load=u.load,
                        job_count=u.job_count,
                        at=now,
                    )
                )
            elif which == "update_job":
                j = msg.update_job
                self._job_status.append(
                    JobStatusUpdate(
                        worker_id=conn.worker_id,
                        job_id=j.job_id,
                        status=agent.JobStatus.Name(j.status),
                        error=j.error,
                        at=now,
                    )
                )
            elif which == "availability":
                self._availability[msg.availability.job_id] = msg.availability
            self._cond.notify_all()

        if which == "availability":
            fut = self._pending_offers.pop(msg.availability.job_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.availability)
        elif which == "ping" and conn.ws is not None:
            pong = agent.ServerMessage()
            pong.pong.last_timestamp = msg.ping.timestamp
            pong.pong.timestamp = int(time.time() * 1000)
            await conn.ws.send_bytes(pong.SerializeToString())

    def _pick(self, worker_id: str | None) -> WorkerConnection:
        with self._cond:
            if worker_id is not None:
                conn = self._workers.get(worker_id)
                if conn is None or not conn.connected:
                    raise RuntimeError(f"worker {worker_id} is not connected")
                return conn
            live = [c for c in self._workers.values() if c.connected]
        if len(live) != 1:
            raise RuntimeError(f"expected exactly one connected worker, have {len(live)}")
        return live[0]

    # -- test API --------------------------------------------------------------------------

    def wait_registered(self, timeout: float = 15.0) -> WorkerConnection:
        """Block until a worker is connected; return it (the most recent if several)."""

        def _live() -> WorkerConnection | None:
            live = [c for c in self._workers.values() if c.connected]
            return live[-1] if live else None

        conn = self._wait(_live, timeout)
        if conn is None:
            raise TimeoutError(f"no worker registered within {timeout}s")
        return conn

    def wait_disconnected(self, worker_id: str, timeout: float) -> bool:
        """Block until the worker's websocket closed; False on timeout."""
        return self._wait(lambda: self._workers[worker_id].disconnected_at is not None, timeout) is True

    def connected_workers(self) -> list[WorkerConnection]:
        with self._cond:
            return [c for c in self._workers.values() if c.connected]

    def offer_job(
        self,
        timeout: float = 5.0,
        *,
        worker_id: str | None = None,
        job_id: str | None = None,
        room: str | None = None,
    ) -> JobOfferResult:
        """Offer a job like the real server does and, if the worker says available, assign it.

        Blocks for at most ``timeout`` waiting for the ``AvailabilityResponse``.
        """
        conn = self._pick(worker_id)
        n = next(self._ids)
        jid = job_id or f"AJ_{n}"
        room_name = room or f"room-{n}"

        async def _offer() -> JobOfferResult:
            job = agent.Job(
                id=jid,
                dispatch_id=f"AD_{n}",
                type=agent.JobType.JT_ROOM,
                room=models.Room(sid=f"RM_{n}", name=room_name),
                agent_name=conn.agent_name,
            )
            fut: asyncio.Future[agent.AvailabilityResponse] = asyncio.get_running_loop().create_future()
            self._pending_offers[jid] = fut
            req = agent.ServerMessage()
            req.availability.job.CopyFrom(job)
            assert conn.ws is not None
            await conn.ws.send_bytes(req.SerializeToString())
            try:
                resp = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                self._pending_offers.pop(jid, None)
                return JobOfferResult(job_id=jid, accepted=False, responded=False)
            answered_at = time.monotonic()
            if resp.available:
                identity = resp.participant_identity or f"agent-{jid}"
                token = (
                    api.AccessToken(self._api_key, self._api_secret)
                    .with_identity(identity)
                    .with_kind("agent")
                    .with_grants(api.VideoGrants(room_join=True, room=room_name, agent=True))
                    .to_jwt()
                )
                assign = agent.ServerMessage()
                assign.assignment.job.CopyFrom(job)
                assign.assignment.token = token
                await conn.ws.send_bytes(assign.SerializeToString())
            return JobOfferResult(
                job_id=jid,
                accepted=resp.available,
                responded=True,
                terminate=resp.terminate,
                participant_identity=resp.participant_identity,
                answered_at=answered_at,
            )

        return self._call(_offer, timeout + 5.0)  # type: ignore[no-any-return]

    def terminate_job(self, job_id: str, *, worker_id: str | None = None) -> None:
        """Send ``JobTermination`` (what the server does when a room is deleted)."""
        conn = self._pick(worker_id)

        async def _terminate() -> None:
            msg = agent.ServerMessage()
            msg.termination.job_id = job_id
            assert conn.ws is not None
            await conn.ws.send_bytes(msg.SerializeToString())

        self._call(_terminate, 5.0)

    def worker_status(self, worker_id: str | None = None) -> list[WorkerStatusUpdate]:
        """Every ``UpdateWorkerStatus`` received so far, oldest first."""
        with self._cond:
            return [s for s in self._worker_status if worker_id in (None, s.worker_id)]

    def job_statuses(self, job_id: str | None = None) -> list[JobStatusUpdate]:
        """Every ``UpdateJobStatus`` received so far, oldest first."""
        with self._cond:
            return [s for s in self._job_status if job_id in (None, s.job_id)]

    def availability_answers(self) -> dict[str, agent.AvailabilityResponse]:
        """Every ``AvailabilityResponse`` by job id, including answers that came too late."""
        with self._cond:
            return dict(self._availability)

    def messages(self) -> list[tuple[float, str, agent.WorkerMessage]]:
        """Raw log of ``(monotonic time, worker id, WorkerMessage)``."""
        with self._cond:
            return list(self._messages)

    def wait_worker_status(
        self, status: str, timeout: float, *, since: float = 0.0, worker_id: str | None = None
    ) -> WorkerStatusUpdate | None:
        """First status update equal to ``status`` received at or after ``since``."""

        def _find() -> WorkerStatusUpdate | None:
            ok = (u for u in self._worker_status if u.status == status and u.at >= since)
            return next((u for u in ok if worker_id in (None, u.worker_id)), None)

        return self._wait(_find, timeout)

    def wait_job_status(self, job_id: str, status: str, timeout: float) -> JobStatusUpdate | None:
        def _find() -> JobStatusUpdate | None:
            return next((u for u in self._job_status if (u.job_id, u.status) == (job_id, status)), None)

        return self._wait(_find, timeout)

    def _wait(self, predicate: Callable[[], _T | None], timeout: float) -> _T | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
