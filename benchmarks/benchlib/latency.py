"""Section 1: healthy close latency, vanilla vs the layer, in one process.

Batches of sessions alternate between the two modes (V L L V V L ...) so machine drift
(thermal, other load, allocator growth) lands on both equally. Every session does one
full reply turn, then ``aclose()`` is timed. The layer runs with its production defaults
(drain 5 s, close 10 s): a healthy close must never be forced.

Two configurations, interleaved the same way in the same run: ``healthy``, with the
benchmark's final-transcript wait (``TRANSCRIPT_TIMEOUT``, which every close waits in full
on the silent fake STT), and ``floor``, with ``session_close_transcript_timeout=0``: no
wait at all, so what remains is the close's own fixed cost, and the ratio shows the layer's.
The floor is also measured with :mod:`.skeleton` (the bounded close's bare shape: its
closing task and watch tasks, none of its bookkeeping), the lowest ratio this design allows.
"""

from __future__ import annotations

import gc
from typing import Any, cast

from . import skeleton
from .common import TRANSCRIPT_TIMEOUT, Mode, close_session, forced, open_session, set_mode, summary

#: configuration -> the final-transcript wait of its sessions
CONFIGS: dict[str, float] = {"healthy": TRANSCRIPT_TIMEOUT, "floor": 0.0}


def _ratios(van: dict[str, float], lay: dict[str, float]) -> dict[str, float]:
    return {
        "median": round(lay["median_ms"] / van["median_ms"], 3),
        "p99": round(lay["p99_ms"] / van["p99_ms"], 3),
        "max": round(lay["max_ms"] / van["max_ms"], 3),
    }


#: the modes each configuration is measured in; the floor also with the close's bare shape
MODES: dict[str, tuple[str, ...]] = {
    "healthy": ("vanilla", "layer"),
    "floor": ("vanilla", "layer", "skeleton"),
}


def _switch(mode: str) -> None:
    """``vanilla``, ``layer`` or ``skeleton`` (see :mod:`.skeleton`): never two at once."""
    if mode == "skeleton":
        set_mode("vanilla")
        skeleton.install()
    else:
        skeleton.uninstall()
        set_mode(cast(Mode, mode))


def _order(modes: tuple[str, ...], b: int) -> tuple[str, ...]:
    """Each batch rotates the modes, so no mode always runs first or last."""
    k = b % len(modes)
    rotated = modes[k:] + modes[:k]
    return rotated if b % 2 == 0 else rotated[::-1]


async def run(mode: str, quick: bool) -> dict[str, Any]:
    n = 40 if quick else 500
    batch = 10 if quick else 25
    warmup = 3 if quick else 20
    ms: dict[str, dict[str, list[float]]] = {c: {m: [] for m in MODES[c]} for c in CONFIGS}
    forced_n = dict.fromkeys(CONFIGS, 0)
    not_closed = 0
    for m in ("vanilla", "layer", "skeleton"):  # first sessions pay one-time costs: not measured
        _switch(m)
        for config, wait in CONFIGS.items():
            for _ in range(warmup if m in MODES[config] else 0):
                await close_session(await open_session(None, transcript_timeout=wait), 5.0)
    configs = list(CONFIGS)
    for b in range(n // batch):
        for config in configs if b % 4 < 2 else configs[::-1]:
            for m in _order(MODES[config], b):
                _switch(m)
                gc.collect()
                for _ in range(batch):
                    opened = await open_session(None, transcript_timeout=CONFIGS[config])
                    closed, t = await close_session(opened, 5.0)
                    ms[config][m].append(t)
                    not_closed += not closed
                    if m == "layer":
                        forced_n[config] += forced(opened.session)
    _switch("vanilla")
    out: dict[str, Any] = {}
    for config, wait in CONFIGS.items():
        van, lay = summary(ms[config]["vanilla"]), summary(ms[config]["layer"])
        out[config] = {
            "transcript_timeout_s": wait,
            "vanilla": van,
            "layer": {**lay, "forced": forced_n[config]},
            "ratios": _ratios(van, lay),
        }
        if "skeleton" in ms[config]:
            bare = summary(ms[config]["skeleton"])
            out[config]["skeleton"] = {**bare, "ratios": _ratios(van, bare)}
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
