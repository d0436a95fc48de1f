"""What finding a session's own streams costs a close, with other sessions open in the process.

Every close asks the stream ledger for its session's streams twice (before upstream's close
runs, and at its end). This closes healthy sessions at the floor with the layer while K other
started sessions stay open, and times those calls in place (``perf_counter`` around the
layer's ``streams_of``): microseconds per close, by K. There is no vanilla column: vanilla has
no ledger. ``run.py`` gives the close's ratios against vanilla.

    .venv/bin/python benchmarks/streams_cost.py [closes] [K ...]   # default 50 closes, K = 0 10 30
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from benchlib.common import close_session, open_session, quiet_logs, set_mode

from livekit_safeclose import streams

WARMUP = 10


async def _per_close(others: int, closes: int) -> tuple[float, float]:
    """(microseconds in ``streams_of`` per close, calls per close) with ``others`` open."""
    spent = [0.0, 0.0]
    original = streams.streams_of

    def timed(session: Any) -> list[streams.OpenStream]:
        t = time.perf_counter()
        try:
            return original(session)
        finally:
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    held = [await open_session(None, turn=False, transcript_timeout=0.0) for _ in range(others)]
    for _ in range(WARMUP):
        await close_session(await open_session(None, transcript_timeout=0.0), 5.0)
    streams.streams_of = timed  # type: ignore[assignment]
    try:
        for _ in range(closes):
            await close_session(await open_session(None, transcript_timeout=0.0), 5.0)
    finally:
        streams.streams_of = original  # type: ignore[assignment]
        for opened in held:
            await close_session(opened, 5.0)
    return spent[0] / closes * 1e6, spent[1] / closes


async def main(closes: int, ks: list[int]) -> None:
    quiet_logs()
    set_mode("layer")
    print("| other sessions open | streams_of, us per close | calls per close |")
    print("| ---: | ---: | ---: |")
    for k in ks:
        us, calls = await _per_close(k, closes)
        print(f"| {k} | {us:.1f} | {calls:.0f} |")
    set_mode("vanilla")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(args[0] if args else 50, args[1:] or [0, 10, 30]))
