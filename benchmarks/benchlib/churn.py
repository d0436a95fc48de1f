"""Section 3: churn soak. Many sessions opened and closed in one process, as a worker
does all day; 20% carry a random fault from the catalogue. What accumulates is what
would take a long-running worker down: open streams, live tasks, timers, descriptors,
memory.

Zombies (tasks that swallowed their cancellation) are released only at the end of the
run, so they count, apart. RSS is measured after a warm-up (one-time allocations: code
paths, caches, the VAD's executor) with a ``gc.collect()`` before each reading.

Vanilla closes are given ``VANILLA_WAIT`` each and then left behind, as a worker's job
guard would; its sessions with a fault never close and keep their audio pipeline
running, so vanilla runs fewer sessions.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import random
import sys
import weakref
from collections import Counter
from typing import Any

import livekit_safeclose as lsc
from livekit_safeclose import patching
from livekit_safeclose.options import Options
from livekit_safeclose.patch_table import LEDGER, PATCHES
from livekit_safeclose.testing.scenarios import Scenario

from .common import (
    TRANSCRIPT_TIMEOUT,
    Mode,
    close_session,
    fault_kinds,
    forced,
    open_fds,
    open_session,
    pending_timers,
    set_mode,
    settled_rss,
    stop_leftovers,
    task_census,
)

FAULT_RATE = 0.2
CONCURRENCY = 4
DRAIN_TIMEOUT = 0.2
CLOSE_TIMEOUT = 1.5
VANILLA_WAIT = 0.5
SEED = 20240605
#: measured sessions between two RSS readings
CHECKPOINT = 250
CHECKPOINT_QUICK = 50


def _plans(
    mode: Mode, quick: bool, rng: random.Random
) -> tuple[list[Scenario | None], list[Scenario | None]]:
    """(warm-up, measured) sessions; ``None`` is a healthy one. The warm-up runs every
    fault kind (twice on a full layer run) so each code path's one-time allocations are done
    before the RSS baseline is taken."""
    kinds = fault_kinds()
    if mode == "layer":
        reps, warm_total = (1, 50) if quick else (2, 100)
    else:
        reps, warm_total = (1, 20) if quick else (1, 40)
    warm: list[Scenario | None] = [k for k in kinds for _ in range(reps)]
    warm += [None] * max(0, warm_total - len(warm))
    rng.shuffle(warm)
    n = (200 if quick else 2000) if mode == "layer" else (60 if quick else 300)
    measured = [rng.choice(kinds) if rng.random() < FAULT_RATE else None for _ in range(n)]
    return warm, measured


def _second_half(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RSS growth over the second half of the measured sessions: past the warm-up's
    ratchet, a leak still shows here."""
    if len(curve) < 2:
        return None
    mid = curve[max(0, len(curve) // 2 - 1)]
    last = curve[-1]
    return {"from": mid["sessions"], "to": last["sessions"], "mb": round(last["rss_mb"] - mid["rss_mb"], 2)}


def _timers_by_owner() -> dict[str, int]:
    loop: Any = asyncio.get_running_loop()
    out: Counter[str] = Counter()
    for h in getattr(loop, "_scheduled", []):
        if not h.cancelled():
            cb = h._callback
            out[str(getattr(cb, "__qualname__", type(cb).__name__))] += 1
    return dict(out)


async def _gauges(before: set[asyncio.Task[Any]], ledgers: list[Any]) -> dict[str, Any]:
    return {
        "open_streams": lsc.open_streams()["total"],
        "provider_open": sum(led.open_count() for led in ledgers),
        **task_census(before),
        "timers": pending_timers(),
        "fds": open_fds(),
        "rss_bytes": settled_rss(),
        # live Python objects' memory blocks: unlike RSS, falls back when memory is freed
        "py_blocks": sys.getallocatedblocks(),
    }


def _closed_alive(closed: weakref.WeakSet[Any], with_zombies: weakref.WeakSet[Any]) -> dict[str, int]:
    """Sessions whose close returned and that are still in memory after a full collection:
    ``held`` apart from the ones a zombie of theirs still holds."""
    gc.collect()
    alive = list(closed)
    return {"total": len(alive), "zombies_sessions": sum(s in with_zombies for s in alive),
            "held": sum(s not in with_zombies for s in alive)}  # fmt: skip


def _malloc_trim() -> int | None:
    """RSS after ``malloc_trim(0)`` (glibc), ``None`` where there is no such call."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return None
    gc.collect()
    trim(0)
    return settled_rss()


async def run(mode: str, quick: bool) -> dict[str, Any]:
    m: Mode = "layer" if mode == "layer" else "vanilla"
    set_mode(m, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
    if m == "vanilla":
        patching.apply(PATCHES, LEDGER, Options.validated())  # observation only: no close patch
    limit = CLOSE_TIMEOUT + 1.0 if m == "layer" else VANILLA_WAIT
    rng = random.Random(SEED)
    warm, measured = _plans(m, quick, rng)
    plan = warm + measured
    before = set(asyncio.all_tasks())
    # bookkeeping kept small, it is inside the measurement: the ledgers of sessions that
    # had a fault or left a connection open (zombies are released through them), and a
    # weak set of the sessions (its entries go as the sessions are collected)
    ledgers: list[Any] = []
    sessions: weakref.WeakSet[Any] = weakref.WeakSet()
    #: sessions whose close returned, and those of them whose close left a zombie (a zombie's
    #: frames hold its session until it is released)
    closed_ok: weakref.WeakSet[Any] = weakref.WeakSet()
    with_zombies: weakref.WeakSet[Any] = weakref.WeakSet()
    per_kind: Counter[str] = Counter()
    not_closed: Counter[str] = Counter()
    forced_healthy = 0
    #: what the per-session audit found right after each close, by fault kind
    audit_found: dict[str, Counter[str]] = {}
    next_i = 0

    async def worker(stop: int) -> None:
        nonlocal next_i, forced_healthy
        while next_i < stop:
            i = next_i
            next_i += 1
            fault = plan[i]
            opened = await open_session(fault)
            sessions.add(opened.session)
            closed, _ = await close_session(opened, limit)
            if fault is not None or opened.ctx.ledger.open_count():
                ledgers.append(opened.ctx.ledger)
            kind = fault.id if fault is not None else "healthy"
            per_kind[kind] += 1
            not_closed[kind] += not closed
            if m == "layer" and fault is None:
                forced_healthy += forced(opened.session)
            found = lsc.audit(opened.session)
            if closed:
                closed_ok.add(opened.session)
            if found.zombies:
                with_zombies.add(opened.session)
            for what, count in (
                ("tasks", len(found.tasks)),
                ("zombies", len(found.zombies)),
                ("timers", len(found.timers)),
                ("streams", found.streams.get("total", 0)),
            ):
                if count:
                    audit_found.setdefault(what, Counter())[kind] += 1

    await asyncio.gather(*(worker(len(warm)) for _ in range(CONCURRENCY)))
    start = await _gauges(before, ledgers)
    # RSS along the run: where it stops growing tells a warm-up ratchet from a leak
    curve: list[dict[str, Any]] = []
    step = CHECKPOINT_QUICK if quick else CHECKPOINT
    for stop in range(len(warm) + step, len(plan) + step, step):
        await asyncio.gather(*(worker(min(stop, len(plan))) for _ in range(CONCURRENCY)))
        g = await _gauges(before, ledgers)
        curve.append({"sessions": next_i - len(warm), "rss_mb": round(g["rss_bytes"] / 2**20, 2),
                      "py_blocks": g["py_blocks"], "zombies": g["zombies"], "alive": len(sessions)})  # fmt: skip
    end = await _gauges(before, ledgers)
    end["timers_by_callback"] = _timers_by_owner()
    end["sessions_alive"] = len(sessions)
    end["closed_sessions_alive"] = _closed_alive(closed_ok, with_zombies)

    # release the zombies (and, on vanilla, stop what never closed), then look again
    for led in ledgers:
        led.release()
    uncancellable = await stop_leftovers(before)
    await asyncio.sleep(0.1)
    after = await _gauges(before, ledgers)
    after["sessions_alive"] = len(sessions)
    after["closed_sessions_alive"] = _closed_alive(closed_ok, with_zombies)
    trimmed = _malloc_trim()
    set_mode("vanilla")
    patching.revert_all()
    return {
        "sessions": len(measured),
        "warmup": len(warm),
        "faults": sum(f is not None for f in measured),
        "warmup_faults": sum(f is not None for f in warm),
        "fault_rate": FAULT_RATE,
        "concurrency": CONCURRENCY,
        "transcript_timeout_s": TRANSCRIPT_TIMEOUT,
        "close_wait_s": limit,
        "layer_options": {"drain_timeout": DRAIN_TIMEOUT, "close_timeout": CLOSE_TIMEOUT}
        if m == "layer"
        else None,
        "not_closed": sum(not_closed.values()),
        "not_closed_by_kind": {k: v for k, v in not_closed.items() if v},
        "sessions_by_kind": dict(per_kind),
        "forced_healthy_closes": forced_healthy if m == "layer" else None,
        "sessions_with_audit_findings": {k: dict(v) for k, v in audit_found.items()},
        "after_warmup": start,
        "end": end,
        "after_release": after,
        "uncancellable_at_cleanup": uncancellable,
        "rss_growth_mb": round((end["rss_bytes"] - start["rss_bytes"]) / 2**20, 2),
        "rss_curve": curve,
        "rss_growth_second_half": _second_half(curve),
        "rss_growth_after_release_mb": round((after["rss_bytes"] - start["rss_bytes"]) / 2**20, 2),
        "py_blocks_growth": end["py_blocks"] - start["py_blocks"],
        "py_blocks_growth_after_release": after["py_blocks"] - start["py_blocks"],
        # glibc handing its free pages back: what RSS growth is left after it is memory the
        # process holds, the rest was freed memory the allocator kept
        "rss_growth_after_trim_mb": None
        if trimmed is None
        else round((trimmed - start["rss_bytes"]) / 2**20, 2),
        "fd_growth": end["fds"] - start["fds"],
        "timer_growth": end["timers"] - start["timers"],
    }
