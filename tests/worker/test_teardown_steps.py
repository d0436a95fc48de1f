"""The bounded teardown's pieces in-process (``livekit_safeclose.worker.teardown``): a step
past its bound is cancelled lock-free and named, a bounded shutdown callback still looks like
the original to upstream's trace, and nothing is bounded outside a job's teardown."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from livekit import rtc
from livekit.agents.ipc import job_proc_lazy_main

import livekit_safeclose as lsc
from livekit_safeclose.worker import teardown


@pytest.fixture
def layer() -> Any:
    lsc.install(drain_timeout=0.3, close_timeout=0.5, worker=True, signal_guard=False)
    yield
    lsc.uninstall()


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_bounded_cancels_a_step_that_swallows_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def zombie() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="livekit.agents.safeclose"):
        assert await teardown.bounded(zombie(), "a zombie step", 0.3) is None
    took = time.monotonic() - t0
    assert took < 0.3 + teardown.STEP_UNWIND + 0.3, took
    msg = next(r.getMessage() for r in caplog.records if "a zombie step" in r.getMessage())
    assert "test_teardown_steps.py" in msg and "zombie" in msg, msg
    release.set()


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_bounded_callback_keeps_what_upstream_reads(layer: None) -> None:
    ran: list[str] = []

    async def user_cb(reason: str) -> None:
        ran.append(reason)

    async def failing_cb(reason: str) -> None:
        raise RuntimeError("boom")

    class _Ctx:
        _shutdown_callbacks = [user_cb, failing_cb]

    class _Proc:
        _job_ctx = _Ctx()

    with teardown.bounded_steps(_Proc()):
        wrapped = list(_Ctx._shutdown_callbacks)
    assert [c.__wrapped__ for c in wrapped] == [user_cb, failing_cb]  # type: ignore[attr-defined]
    assert job_proc_lazy_main._callback_name(wrapped[0]) == user_cb.__qualname__
    assert not job_proc_lazy_main._is_framework_callback(wrapped[0])
    await asyncio.gather(*(c("job done") for c in wrapped))  # the failure is logged, not raised
    assert ran == ["job done"]


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_nothing_bounded_outside_a_teardown(layer: None) -> None:
    assert rtc.Room.disconnect.__wrapped__ is not None  # type: ignore[attr-defined]
    room = rtc.Room()
    await room.disconnect()  # not connected: upstream returns at once, unbounded path
    assert not teardown._in_teardown.get()
