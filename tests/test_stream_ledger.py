"""The stream ledger attributes a stream to its session as the stream opens, so asking for a
session's streams (twice on every close) walks no stack and costs what that session has
open, however many other sessions the process holds.

Before, the STT stream stayed unattributed until a close asked, and every close then walked
the await chain of every other session's STT pump: 41 us per close alone, 883 us with 30
other sessions open; 6 and 11 us now. An STT stream's open asks the session its pump's part
names, so it too stays flat: 79 us alone, 86 us with 30 others
(``.venv/bin/python benchmarks/streams_cost.py 100``).
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


async def test_an_opening_stream_asks_only_the_session_its_maker_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Opening a session's STT stream costs the same however many sessions the process
    holds: the session the pump's part names claims it, and no other session is asked."""
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    held = await _started(3)
    asked: list[Any] = []
    real = streams._recognition_parts

    def counted(session: Any, acts: list[Any]) -> list[Any]:
        asked.append(session)
        return real(session, acts)

    with monkeypatch.context() as m:
        m.setattr(streams, "_recognition_parts", counted)
        m.setattr(streams, "noted_sessions", lambda: pytest.fail("every session was asked"))
        (session,) = await _started(1)
    try:
        assert [id(s) for s in asked] == [id(session)]
        assert lsc.open_streams(session)["stt"] == 1
    finally:
        await _close_all([*held, session])


async def test_a_stream_whose_maker_names_no_session_is_claimed_by_asking_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The part's hint is only a shortcut (a release whose parts name no session): without
    it, the sessions are asked in turn, and the right one still claims the stream."""
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    monkeypatch.setattr(streams, "_named_sessions", lambda _part: [])
    sessions = await _started(3)
    try:
        assert not streams._orphans
        assert {id(e.session) for e in _stt_entries()} == {id(s) for s in sessions}
    finally:
        await _close_all(sessions)
