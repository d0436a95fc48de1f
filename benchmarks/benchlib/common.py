"""What the sections share: statistics, process gauges read from /proc, the layer switch,
and one way to open a healthy or faulty session on the fakes and close it."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import livekit_safeclose as lsc
from livekit_safeclose.testing.scenarios import (
    SCENARIOS,
    Ctx,
    Scenario,
    ScenarioAgent,
    load_vad,
    make_session,
)

Mode = Literal["vanilla", "layer"]

#: the final-transcript wait of every benchmark session (upstream default 2 s): the fake
#: STT is silent, so each close waits for it in full; kept short so it does not dominate
TRANSCRIPT_TIMEOUT = 0.05

#: scenario ids whose close is not a plain aclose() (they race or escalate on purpose)
_SPECIAL_CLOSE = ("race-aclose-shutdown", "escalate-graceful")


def quiet_logs() -> None:
    """Forced closes log one WARNING each: thousands of them would drown the table."""
    logging.disable(logging.CRITICAL)


def set_mode(mode: Mode, *, drain_timeout: float = 5.0, close_timeout: float = 10.0) -> None:
    """Vanilla is ``uninstall()``, the layer is ``install(...)``: nothing else differs."""
    if mode == "layer":
        lsc.install(drain_timeout=drain_timeout, close_timeout=close_timeout)
    else:
        lsc.uninstall()


# -- statistics ----------------------------------------------------------------------


def pct(xs: Sequence[float], q: float) -> float:
    """Percentile ``q`` (0..100), linear between closest ranks (numpy's default)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "median_ms": round(pct(xs, 50), 2),
        "p99_ms": round(pct(xs, 99), 2),
        "max_ms": round(max(xs), 2) if xs else math.nan,
        "mean_ms": round(sum(xs) / len(xs), 2) if xs else math.nan,
    }


# -- process gauges ------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size from /proc/self/statm (no psutil needed)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    """RSS after a full collection, so garbage waiting for the GC does not count."""
    gc.collect()
    return rss_bytes()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pending_timers() -> int:
    """Timer handles the running loop still has scheduled (cancelled ones excluded)."""
    loop: Any = asyncio.get_running_loop()
    return sum(not h.cancelled() for h in getattr(loop, "_scheduled", []))


def task_census(before: set[asyncio.Task[Any]]) -> dict[str, int]:
    """Tasks started since ``before`` that still run, the zombies apart: a zombie was
    cancelled and swallowed it, which nothing short of the process exiting stops."""
    me = asyncio.current_task()
    live = [t for t in asyncio.all_tasks() if t not in before and t is not me and not t.done()]
    zombies = sum(t.cancelling() > 0 for t in live)
    return {"tasks": len(live) - zombies, "zombies": zombies}


async def stop_leftovers(before: set[asyncio.Task[Any]], timeout: float = 2.0) -> int:
    """Cancel every task started since ``before`` (bounded: zombies stay). Returns how
    many could not even be cancelled: on vanilla, a tool awaiting its own session's close
    is an await cycle, and ``Task.cancel()`` recurses around it until RecursionError."""
    me = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t not in before and t is not me and not t.done()]
    cycles = 0
    for t in leftovers:
        try:
            t.cancel()
        except RecursionError:
            cycles += 1
    if leftovers:
        await asyncio.wait(leftovers, timeout=timeout)
    return cycles


# -- sessions ------------------------------------------------------------------------


def fault_kinds() -> list[Scenario]:
    """One catalogue scenario per hang class, on the ``aclose()`` path: the faults a
    churning worker meets (the restart class has no aclose path; races are excluded)."""
    return [
        s
        for s in SCENARIOS.values()
        if s.vanilla_hangs
        and s.path == "aclose"
        and not s.restart
        and s.id not in _SPECIAL_CLOSE
        and "fuzz" not in s.tags  # replayed from a schedule, not runnable as a plain fault
    ]


@dataclass
class Opened:
    """One started session and what its close needs."""

    ctx: Ctx
    session: Any
    fault: Scenario | None
    starter: asyncio.Future[Any] | None = None
    closes: int = 0


async def open_session(
    fault: Scenario | None, *, turn: bool = True, transcript_timeout: float = TRANSCRIPT_TIMEOUT
) -> Opened:
    """A roomless session on the fakes with the shared Silero VAD. Healthy (``fault`` is
    None): one full reply turn when ``turn``, so LLM and TTS streams were used. Faulty:
    the scenario's setup and trigger, until the fault is engaged."""
    ctx = Ctx()
    agent = await fault.setup(ctx) if fault is not None else ScenarioAgent(ctx)
    session = ctx.session = make_session(ctx, load_vad(), transcript_timeout=transcript_timeout)
    opened = Opened(ctx, session, fault)

    def _on_close(_: Any) -> None:
        opened.closes += 1

    session.on("close", _on_close)
    if fault is not None and fault.during_start:
        opened.starter = asyncio.ensure_future(session.start(agent))
        await asyncio.wait_for(ctx.engaged.wait(), 5)
        return opened
    await session.start(agent)
    if fault is None:
        if turn:
            await asyncio.wait_for(_reply(session), 5)
        return opened
    if fault.trigger is not None:
        await fault.trigger(ctx)
    await asyncio.wait_for(ctx.engaged.wait(), 5)
    await asyncio.sleep(0.05)  # as run_scenario: let the fault settle where it parks
    return opened


async def _reply(session: Any) -> None:
    await session.generate_reply(user_input="hello")


async def close_session(opened: Opened, limit: float) -> tuple[bool, float]:
    """``aclose()`` waited for at most ``limit`` s (the close is left running after
    that, as a worker that gave up on it would). Returns (closed, ms)."""
    t0 = time.perf_counter()
    closer = asyncio.ensure_future(opened.session.aclose())
    done, _ = await asyncio.wait({closer}, timeout=limit)
    ms = (time.perf_counter() - t0) * 1000
    if opened.starter is not None:
        await asyncio.wait({opened.starter}, timeout=0.2)
    if done and not closer.cancelled() and closer.exception() is not None:
        return False, ms
    return bool(done), ms


def forced(session: Any) -> bool:
    report = lsc.last_close_report(session)
    return bool(report is not None and report.forced)
