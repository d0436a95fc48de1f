"""Section 1: healthy close latency, vanilla vs the layer, in one process.

Batches of sessions alternate between the two modes (V L L V V L ...) so machine drift
(thermal, other load, allocator growth) lands on both equally. Every session does one
full reply turn, then ``aclose()`` is timed. The layer runs with its production defaults
(drain 5 s, close 10 s): a healthy close must never be forced.

Two configurations, interleaved the same way in the same run: ``healthy``, with the
benchmark's final-transcript wait (``TRANSCRIPT_TIMEOUT``, which every close waits in full
on the silent fake STT), and ``floor``, with ``session_close_transcript_timeout=0``: no
wait at all, so what remains is the close's own fixed cost, and the ratio shows the layer's.
"""

from __future__ import annotations

import gc
from typing import Any

from .common import TRANSCRIPT_TIMEOUT, Mode, close_session, forced, open_session, set_mode, summary

#: configuration -> the final-transcript wait of its sessions
CONFIGS: dict[str, float] = {"healthy": TRANSCRIPT_TIMEOUT, "floor": 0.0}


def _ratios(van: dict[str, float], lay: dict[str, float]) -> dict[str, float]:
    return {
        "median": round(lay["median_ms"] / van["median_ms"], 3),
        "p99": round(lay["p99_ms"] / van["p99_ms"], 3),
        "max": round(lay["max_ms"] / van["max_ms"], 3),
    }


async def run(mode: str, quick: bool) -> dict[str, Any]:
    n = 40 if quick else 500
    batch = 10 if quick else 25
    warmup = 3 if quick else 20
    ms: dict[str, dict[Mode, list[float]]] = {c: {"vanilla": [], "layer": []} for c in CONFIGS}
    forced_n = dict.fromkeys(CONFIGS, 0)
    not_closed = 0
    for m in ("vanilla", "layer"):  # first sessions pay one-time costs: not measured
        set_mode(m)
        for wait in CONFIGS.values():
            for _ in range(warmup):
                await close_session(await open_session(None, transcript_timeout=wait), 5.0)
    configs = list(CONFIGS)
    for b in range(n // batch):
        order: tuple[Mode, Mode] = ("vanilla", "layer") if b % 2 == 0 else ("layer", "vanilla")
        for config in configs if b % 4 < 2 else configs[::-1]:
            for m in order:
                set_mode(m)
                gc.collect()
                for _ in range(batch):
                    opened = await open_session(None, transcript_timeout=CONFIGS[config])
                    closed, t = await close_session(opened, 5.0)
                    ms[config][m].append(t)
                    not_closed += not closed
                    if m == "layer":
                        forced_n[config] += forced(opened.session)
    set_mode("vanilla")
    out: dict[str, Any] = {}
    for config, wait in CONFIGS.items():
        van, lay = summary(ms[config]["vanilla"]), summary(ms[config]["layer"])
        out[config] = {
            "transcript_timeout_s": wait,
            "vanilla": van,
            "layer": {**lay, "forced": forced_n[config]},
            "ratios": _ratios(van, lay),
        }
    healthy = out.pop("healthy")
    return {
        "sessions_per_mode": n,
        "batch": batch,
        "warmup_per_mode": warmup,
        "layer_options": {"drain_timeout": 5.0, "close_timeout": 10.0},
        # today's figure at the top level (its shape unchanged), the floor beside it
        **healthy,
        "floor": out["floor"],
        "not_closed": not_closed,
    }
