"""Where the floor's extra cost goes: cProfile over healthy closes at the floor, vanilla and
the layer, in one process. Prints calls per close for both, then the functions whose own
time grew most with the layer (profiled microseconds per close: the profiler inflates small
calls, so read it for where, not how much; ``run.py`` gives the real ratios).

    .venv/bin/python benchmarks/profile_floor.py [closes]   # default 200
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import pstats
import sys

from benchlib.common import open_session, quiet_logs
from benchlib.latency import _switch

WARMUP = 20
TOP = 30


async def _profile(mode: str, closes: int) -> pstats.Stats:
    """Only the ``aclose()`` calls are profiled (with whatever else the loop runs meanwhile)."""
    _switch(mode)
    for _ in range(WARMUP):
        await (await open_session(None, transcript_timeout=0.0)).session.aclose()
    prof = cProfile.Profile()
    for _ in range(closes):
        opened = await open_session(None, transcript_timeout=0.0)
        gc.disable()  # a collection inside one close would land on whichever mode runs it
        prof.enable()
        await opened.session.aclose()
        prof.disable()
        gc.enable()
    return pstats.Stats(prof)


def _name(key: tuple[str, int, str]) -> str:
    path, line, func = key
    return f"{'/'.join(path.split('/')[-2:])}:{line}:{func}"


async def main(closes: int) -> None:
    quiet_logs()
    stats = {m: await _profile(m, closes) for m in ("vanilla", "layer")}
    _switch("vanilla")
    for mode, st in stats.items():
        print(f"{mode}: {st.total_calls / closes:.0f} calls per close")  # type: ignore[attr-defined]
    base = stats["vanilla"].stats  # type: ignore[attr-defined]
    grown = []
    for key, (_, calls, own, _cum, _callers) in stats["layer"].stats.items():  # type: ignore[attr-defined]
        before = base.get(key)
        grown.append(
            (
                (own - (before[2] if before else 0.0)) / closes * 1e6,
                (calls - (before[1] if before else 0)) / closes,
                _name(key),
            )
        )
    print("\n| own time grown, profiled us/close | calls grown per close | function |")
    print("| ---: | ---: | --- |")
    for us, calls, name in sorted(grown, reverse=True)[:TOP]:
        print(f"| {us:.1f} | {calls:.1f} | {name} |")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
