"""Section 4: post-close quiet. After every session is closed, does the event loop go
back to sleep? A session that never really closed keeps waking it (its audio pump, VAD,
STT forwarding), which is the "CPU stays hot after calls end" symptom.

Measured, not inferred: the section runs on :class:`CountingLoop`, whose selector counts
every return from ``select()`` (one per loop wake-up). A window is timed by a thread, so
the measurement itself does not wake the loop; while it is open, every callback the loop
runs is recorded by what it belongs to (a task's coroutine, a timer's function). Windows:
a baseline before any session started, then one after every close returned.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections import Counter
from typing import Any

from livekit_safeclose.testing.scenarios import SCENARIOS

from .common import Mode, Opened, close_session, open_session, set_mode, stop_leftovers

FAULTS = (
    "tool-park-aclose",
    "tool-swallow-aclose",
    "on-exit-hang-aclose",
    "stt-close-hang-aclose",
    "tts-stall-aclose",
)
DRAIN_TIMEOUT = 0.5
CLOSE_TIMEOUT = 2.0
VANILLA_WAIT = 0.5
#: time between the last close returning and the window opening (a close's own
#: done-callbacks run within a loop turn or two)
SETTLE = 0.1


class _CountingSelector:
    """A selector proxy that counts wake-ups (returns from ``select()``)."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self._inner = inner
        self.wakeups = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._inner.select(timeout)
        self.wakeups += 1
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountingLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose wake-ups are counted (see :class:`_CountingSelector`)."""

    def __init__(self) -> None:
        self.counter = _CountingSelector(selectors.DefaultSelector())
        super().__init__(self.counter)  # type: ignore[arg-type]


loop_factory = CountingLoop

_seen: Counter[str] = Counter()


def _owner(handle: asyncio.Handle) -> str:
    """What a callback belongs to: the task it steps or wakes, else its function."""
    cb: Any = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    if not isinstance(owner, asyncio.Task):
        # a timer resolving a future (asyncio.sleep): whoever waits on that future
        args: Any = getattr(handle, "_args", None) or ()
        fut = args[0] if args and isinstance(args[0], asyncio.Future) else None
        for cb2, _ctx in getattr(fut, "_callbacks", None) or []:
            if isinstance(getattr(cb2, "__self__", None), asyncio.Task):
                owner = cb2.__self__
                break
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return "task " + str(getattr(coro, "__qualname__", owner.get_name()))
    return "callback " + str(getattr(cb, "__qualname__", type(cb).__name__))


async def window(seconds: float) -> dict[str, Any]:
    """Wake-ups and the callbacks run during ``seconds``, timed from a thread."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, CountingLoop), "run this section on CountingLoop"
    done: asyncio.Future[tuple[int, int]] = loop.create_future()
    original = asyncio.Handle._run
    recording = threading.Event()

    def _run(self: asyncio.Handle) -> None:
        if recording.is_set():
            _seen[_owner(self)] += 1
        original(self)

    def timer() -> None:
        time.sleep(0.05)  # let the awaiting task park first
        start = loop.counter.wakeups
        recording.set()
        time.sleep(seconds)
        recording.clear()
        end = loop.counter.wakeups
        loop.call_soon_threadsafe(done.set_result, (start, end))

    _seen.clear()
    asyncio.Handle._run = _run  # type: ignore[method-assign]
    try:
        threading.Thread(target=timer, daemon=True).start()
        start, end = await done
    finally:
        asyncio.Handle._run = original  # type: ignore[method-assign]
    return {
        "seconds": seconds,
        "wakeups": end - start,
        "per_s": round((end - start) / seconds, 1),
        "top_callbacks": dict(_seen.most_common(8)),
    }


async def run(mode: str, quick: bool) -> dict[str, Any]:
    m: Mode = "layer" if mode == "layer" else "vanilla"
    n = 10 if quick else 20
    seconds = 1.0 if quick else 2.0
    set_mode(m, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
    before = set(asyncio.all_tasks())
    baseline = await window(seconds)
    faults = [SCENARIOS[FAULTS[i % len(FAULTS)]] if i % 4 == 0 else None for i in range(n)]
    sessions: list[Opened] = list(await asyncio.gather(*(open_session(f) for f in faults)))
    limit = CLOSE_TIMEOUT + 1.0 if m == "layer" else VANILLA_WAIT
    results = await asyncio.gather(*(close_session(o, limit) for o in sessions))
    await asyncio.sleep(SETTLE)
    after = await window(seconds)
    not_closed = sum(not closed for closed, _ in results)
    # release the zombies and stop what never closed
    for o in sessions:
        o.ctx.ledger.release()
    uncancellable = await stop_leftovers(before)
    set_mode("vanilla")
    new = {k: v for k, v in after["top_callbacks"].items() if k not in baseline["top_callbacks"]}
    return {
        "sessions": n,
        "faulty": sum(f is not None for f in faults),
        "faults": [f.id for f in faults if f is not None],
        "close_wait_s": limit,
        "not_closed": not_closed,
        "settle_s": SETTLE,
        "baseline": baseline,
        "after_close": after,
        "attributable_wakeups": max(0, after["wakeups"] - baseline["wakeups"]),
        "attributable_callbacks": new,
        "uncancellable_at_cleanup": uncancellable,
    }
