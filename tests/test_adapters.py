"""The per-release adapters, each form driven on its own: the form is forced the way
:func:`compat.shape` would report it on an older release, and the adapter works on objects
shaped like that release's. The real old releases run in the version matrix
(``tests/test_matrix.py``, ``.ci/matrix.sh``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from livekit_safeclose import adapters, compat


@pytest.fixture
def forms(monkeypatch: pytest.MonkeyPatch) -> Any:
    def force(**chosen: str) -> None:
        monkeypatch.setattr(compat, "_shapes", {**compat.detect_shapes(), **chosen})

    return force


class _ListFormActivity:
    """An activity of 1.5.x-1.6.0: ``_pause_scheduling_task`` replaces the blocked list."""

    def __init__(self) -> None:
        self._drain_blocked_tasks: list[Any] = []
        self._scheduling_paused = False
        self.wakeups = 0

    async def _pause_scheduling_task(self, *, blocked_tasks: list[Any] | None = None) -> None:
        self._scheduling_paused = True
        self._drain_blocked_tasks = blocked_tasks or []

    def _wake_up_scheduling_task(self) -> None:
        self.wakeups += 1


@pytest.mark.asyncio
async def test_list_form_keeps_the_exempted_tasks_across_the_pause(forms: Any) -> None:
    forms(drain_blocked="list")
    pause = adapters.wrap_pause_scheduling(_ListFormActivity._pause_scheduling_task, None)
    act = _ListFormActivity()
    tool = asyncio.ensure_future(asyncio.sleep(10))
    try:
        adapters.add_drain_blocked(act, [tool])  # before the drain: the pause would drop it
        await pause(act)
        assert act._drain_blocked_tasks == [tool]
        late = asyncio.ensure_future(asyncio.sleep(10))
        adapters.add_drain_blocked(act, [late])  # after the pause: the current list, woken
        assert act._drain_blocked_tasks == [tool, late] and act.wakeups == 1
        late.cancel()
    finally:
        tool.cancel()


@pytest.mark.asyncio
async def test_tagged_tasks_form_finds_the_tools_of_the_activitys_speech(forms: Any) -> None:
    """1.5.x: no registry; a tool is a task tagged with its call and the speech handle of
    one of the activity's speech tasks."""
    from livekit.agents import llm
    from livekit.agents.voice.agent import _set_activity_task_info

    forms(tool_registry="tagged_tasks")
    handle, other = object(), object()
    speech = asyncio.ensure_future(asyncio.sleep(10))
    tool = asyncio.ensure_future(asyncio.sleep(10))
    stranger = asyncio.ensure_future(asyncio.sleep(10))
    call = llm.FunctionCall(call_id="c1", name="lookup", arguments="{}")
    _set_activity_task_info(speech, speech_handle=handle)  # type: ignore[arg-type]
    _set_activity_task_info(tool, speech_handle=handle, function_call=call)  # type: ignore[arg-type]
    _set_activity_task_info(stranger, speech_handle=other, function_call=call)  # type: ignore[arg-type]
    act = type("Activity", (), {"_speech_tasks": [speech]})()
    try:
        assert adapters.running_tools(act) == [("lookup", tool)]
        adapters.forget_tool_tasks(act, {tool})  # no registry to take it out of: a no-op
    finally:
        for t in (speech, tool, stranger):
            t.cancel()


@pytest.mark.parametrize(("form", "called"), [("private", "_aclose"), ("public", "aclose")])
@pytest.mark.asyncio
async def test_recognition_close_follows_the_form(forms: Any, form: str, called: str) -> None:
    forms(recognition_close=form)
    seen: list[str] = []

    class Recognition:
        async def _aclose(self) -> None:
            seen.append("_aclose")

        async def aclose(self) -> None:
            seen.append("aclose")

    await adapters.close_recognition(Recognition())
    assert seen == [called]


@pytest.mark.parametrize("form", ["update_activity_task", "update_activity"])
@pytest.mark.asyncio
async def test_start_tasks_follow_the_form(forms: Any, form: str) -> None:
    forms(first_activity=form)

    class Session:
        async def _update_activity_task(self) -> None:
            await asyncio.sleep(10)

        async def _update_activity(self) -> None:
            await asyncio.sleep(10)

    s = Session()
    task = asyncio.ensure_future(getattr(s, "_" + form)())
    other = asyncio.ensure_future(
        (s._update_activity if form == "update_activity_task" else s._update_activity_task)()
    )
    await asyncio.sleep(0)
    try:
        assert adapters.start_tasks(s) == [task]
    finally:
        task.cancel()
        other.cancel()


def test_transcript_wait_is_the_option_or_the_fixed_wait() -> None:
    opts = type("Opts", (), {"session_close_transcript_timeout": 0.7})()
    assert adapters.transcript_timeout(type("S", (), {"_opts": opts})()) == 0.7
    assert adapters.transcript_timeout(type("S", (), {"_opts": object()})()) == adapters.FIXED_TRANSCRIPT_WAIT
