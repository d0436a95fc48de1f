"""Section 1: healthy close latency, vanilla vs the layer, in one process.

Batches of sessions alternate between the two modes (V L L V V L ...) so machine drift
(thermal, other load, allocator growth) lands on both equally. Every session does one
full reply turn, then ``aclose()`` is timed. The layer runs with its production defaults
(drain 5 s, close 10 s): a healthy close must never be forced.
"""

from __future__ import annotations

import gc
from typing import Any

from .common import TRANSCRIPT_TIMEOUT, Mode, close_session, forced, open_session, set_mode, summary


async def run(mode: str, quick: bool) -> dict[str, Any]:
    n = 60 if quick else 500
    batch = 10 if quick else 25
    warmup = 5 if quick else 20
    ms: dict[Mode, list[float]] = {"vanilla": [], "layer": []}
    forced_n = not_closed = 0
    for m in ("vanilla", "layer"):  # first sessions pay one-time costs: not measured
        set_mode(m)
        for _ in range(warmup):
            await close_session(await open_session(None), 5.0)
    for b in range(n // batch):
        order: tuple[Mode, Mode] = ("vanilla", "layer") if b % 2 == 0 else ("layer", "vanilla")
        for m in order:
            set_mode(m)
            gc.collect()
            for _ in range(batch):
                opened = await open_session(None)
                closed, t = await close_session(opened, 5.0)
                ms[m].append(t)
                not_closed += not closed
                if m == "layer":
                    forced_n += forced(opened.session)
    set_mode("vanilla")
    van, lay = summary(ms["vanilla"]), summary(ms["layer"])
    return {
        "sessions_per_mode": n,
        "batch": batch,
        "warmup_per_mode": warmup,
        "transcript_timeout_s": TRANSCRIPT_TIMEOUT,
        "layer_options": {"drain_timeout": 5.0, "close_timeout": 10.0},
        "vanilla": van,
        "layer": {**lay, "forced": forced_n},
        "not_closed": not_closed,
        "ratios": {
            "median": round(lay["median_ms"] / van["median_ms"], 3),
            "p99": round(lay["p99_ms"] / van["p99_ms"], 3),
            "max": round(lay["max_ms"] / van["max_ms"], 3),
        },
    }
