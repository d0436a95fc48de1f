"""The watched upstream call's task (livekit_safeclose.watched): the rules its docstring lists."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest

from livekit_safeclose import stacks, watched

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(10)]


async def _upstream_call(gate: asyncio.Event) -> str:
    await gate.wait()
    return "done"


async def test_waits_are_woken_from_inside_the_task() -> None:
    gate = asyncio.Event()
    seen: list[bool] = []
    task: asyncio.Task[str] | None = None

    def wake() -> None:
        assert task is not None
        seen.append(task.done())  # still running: woken before any done callback

    task = watched.start(_upstream_call(gate), [wake])
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.wait_for(task, 2) == "done"
    assert seen == [False]


async def test_the_wrapper_is_invisible_to_stack_readers() -> None:
    gate = asyncio.Event()
    task = watched.start(_upstream_call(gate), [])
    await asyncio.sleep(0)
    names = [f.f_code.co_name for f in stacks.frames(task)]
    assert names[0] == "_upstream_call"
    assert "_watched" not in names
    assert getattr(task.get_coro(), "__qualname__", None) == "_upstream_call"
    gate.set()
    await asyncio.wait_for(task, 2)


async def test_cancelled_before_it_ran_closes_the_call_unawaited() -> None:
    coro = _upstream_call(asyncio.Event())
    task = watched.start(coro, [])
    task.cancel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        del coro
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def test_cancelled_before_it_ran_still_wakes_its_waits() -> None:
    """The waits on a watched task add no done callback of their own: one that ended without
    running its body is woken by the task's own done callback."""
    seen: list[bool] = []
    task = watched.start(_upstream_call(asyncio.Event()), [lambda: seen.append(task.done())])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    await asyncio.sleep(0)
    assert seen == [True]
