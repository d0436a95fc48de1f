"""The stream ledger attributes a stream to its session as the stream opens, so asking for a
session's streams (twice on every close) walks no stack and costs what that session has
open, however many other sessions the process holds.

Before, the STT stream stayed unattributed until a close asked, and every close then walked
the await chain of every other session's STT pump: 55 us per close alone, 768 us with 30
other sessions open; 5 and 10 us now (``.venv/bin/python benchmarks/streams_cost.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import livekit_safeclose as lsc
from livekit_safeclose import streams
from livekit_safeclose.testing.scenarios import Ctx, ScenarioAgent, make_session

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def _started(n: int) -> list[Any]:
    sessions = []
    for _ in range(n):
        ctx = Ctx()
        session = ctx.session = make_session(ctx)
        await session.start(ScenarioAgent(ctx))
        sessions.append(session)
    for _ in range(100):  # each STT stream opens once its recognition pump runs
        if sum(e.kind == "stt" for e in streams._open.values()) >= n:
            break
        await asyncio.sleep(0.02)
    return sessions


def _stt_entries() -> list[streams.OpenStream]:
    return [e for e in streams._open.values() if e.kind == "stt"]


async def _close_all(sessions: list[Any]) -> None:
    await asyncio.wait_for(asyncio.gather(*(s.aclose() for s in sessions)), 10)


async def test_each_stt_stream_belongs_to_its_session_as_it_opens() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    sessions = await _started(3)
    try:
        entries = _stt_entries()
        assert len(entries) == 3
        assert not streams._orphans
        assert {id(e.session) for e in entries} == {id(s) for s in sessions}
    finally:
        await _close_all(sessions)


async def test_asking_for_a_sessions_streams_walks_no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    sessions = await _started(3)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the ledger walked a task's await chain")

    try:
        with monkeypatch.context() as m:
            m.setattr(streams.stacks, "frames", refuse)
            m.setattr(streams.stacks, "works_for", refuse)
            for session in sessions:
                assert lsc.open_streams(session)["stt"] == 1
    finally:
        await _close_all(sessions)
    assert not any(s in streams._by_session for s in sessions)  # the index keeps no closed session


async def test_an_unclaimed_stream_is_matched_by_its_makers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream no session claimed as it opened (here: the claim is made to fail) is matched
    by the recognition part that made it, still without a walk; so is another session's."""
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    with monkeypatch.context() as m:
        m.setattr(streams, "_claimant", lambda _makers: None)
        sessions = await _started(2)

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the ledger walked a task's await chain")

    try:
        assert len(streams._orphans) == 2
        assert all(e.makers for e in streams._orphans.values())
        with monkeypatch.context() as m:
            m.setattr(streams.stacks, "works_for", refuse)
            assert lsc.open_streams(sessions[0])["stt"] == 1
        # the other session's stream went to that session, not to a walk
        assert not streams._orphans
        assert lsc.open_streams(sessions[1])["stt"] == 1
    finally:
        await _close_all(sessions)


async def test_a_stream_without_makers_is_matched_by_its_creators_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    monkeypatch.setattr(streams, "_makers", lambda _task: ())
    sessions = await _started(1)
    try:
        (entry,) = _stt_entries()
        assert entry.session is None and entry.creator is not None
        assert lsc.open_streams(sessions[0])["stt"] == 1
        assert entry.session is sessions[0]
    finally:
        await _close_all(sessions)
