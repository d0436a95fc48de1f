"""Two rules the 1.5.x tool shape needs (no tool registry; the tools' execute task is a
module-level function that gathers them and awaits them again when cancelled): a task a
zombie awaits that swallowed its own cancel is a zombie too, and a function given an owned
speech handle works for its session."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from livekit_safeclose.close_bookkeeping import CloseBookkeeping
from livekit_safeclose.stacks import works_for


async def _swallowing(release: asyncio.Event) -> None:
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_a_cancelled_task_a_zombie_awaits_is_a_zombie_too() -> None:
    release = asyncio.Event()
    inner = asyncio.create_task(_swallowing(release), name="execute_tools_task")

    async def outer_body() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await inner

    outer = asyncio.create_task(outer_body(), name="pipeline_reply")
    await asyncio.sleep(0.01)
    outer.cancel()  # reaches the awaited inner task too
    await asyncio.sleep(0.01)
    assert not outer.done() and not inner.done() and inner.cancelling() > 0
    book = CloseBookkeeping()
    assert book.mark_zombies([outer]) == [outer]
    assert set(book.zombies) == {outer, inner}
    release.set()
    await asyncio.wait({outer, inner}, timeout=1)


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_a_function_given_an_owned_speech_handle_works_for_its_owner() -> None:
    handle, other = object(), object()

    async def _execute_tools_task(*, speech_handle: object) -> None:
        await asyncio.sleep(5)

    task = asyncio.create_task(_execute_tools_task(speech_handle=handle))
    await asyncio.sleep(0)
    assert works_for(task, {id(handle)}) and not works_for(task, {id(other)})
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
