"""The stand-in dispatch server against a scripted websocket client (no worker process)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from livekit.protocol import agent

from livekit_safeclose.testing.dispatch import DispatchServer


async def _recv(ws: aiohttp.ClientWebSocketResponse) -> agent.ServerMessage:
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return agent.ServerMessage.FromString(msg.data)


async def _send(ws: aiohttp.ClientWebSocketResponse, msg: agent.WorkerMessage) -> None:
    await ws.send_bytes(msg.SerializeToString())


@pytest.mark.asyncio
@pytest.mark.timeout(20)
async def test_register_offer_status_terminate_roundtrip() -> None:
    with DispatchServer() as d:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{d.url}/agent", headers={"Authorization": "Bearer x"}) as ws,
        ):
            reg = agent.WorkerMessage()
            reg.register.agent_name = "a"
            reg.register.version = "1.8.9"
            await _send(ws, reg)
            resp = await _recv(ws)
            assert resp.WhichOneof("message") == "register" and resp.register.worker_id
            conn = await asyncio.to_thread(d.wait_registered, 5)
            assert conn.agent_name == "a" and conn.auth_header == "Bearer x"

            # accepted offer: availability -> answer -> assignment
            offer = asyncio.create_task(asyncio.to_thread(d.offer_job, 5))
            req = await _recv(ws)
            job = req.availability.job
            answer = agent.WorkerMessage()
            answer.availability.job_id = job.id
            answer.availability.available = True
            answer.availability.participant_identity = "agent-x"
            await _send(ws, answer)
            assignment = await _recv(ws)
            assert assignment.assignment.job.id == job.id and assignment.assignment.token
            result = await offer
            assert result.accepted and result.responded and result.job_id == job.id

            # refused offer: no assignment follows
            offer = asyncio.create_task(asyncio.to_thread(d.offer_job, 5))
            req = await _recv(ws)
            answer = agent.WorkerMessage()
            answer.availability.job_id = req.availability.job.id
            answer.availability.available = False
            await _send(ws, answer)
            result = await offer
            assert result.responded and not result.accepted

            # unanswered offer
            result = await asyncio.to_thread(d.offer_job, 0.3)
            assert not result.responded and not result.accepted
            await _recv(ws)  # the availability request we ignored

            status = agent.WorkerMessage()
            status.update_worker.status = agent.WorkerStatus.WS_FULL
            status.update_worker.job_count = 1
            await _send(ws, status)
            job_status = agent.WorkerMessage()
            job_status.update_job.job_id = job.id
            job_status.update_job.status = agent.JobStatus.JS_SUCCESS
            await _send(ws, job_status)
            full = await asyncio.to_thread(d.wait_worker_status, "FULL", 5)
            assert full is not None and full.job_count == 1
            done = await asyncio.to_thread(d.wait_job_status, job.id, "JS_SUCCESS", 5)
            assert done is not None and [s.status for s in d.job_statuses(job.id)] == ["JS_SUCCESS"]

            await asyncio.to_thread(d.terminate_job, job.id)
            term = await _recv(ws)
            assert term.termination.job_id == job.id

        assert await asyncio.to_thread(d.wait_disconnected, conn.worker_id, 5)
        assert d.connected_workers() == []
