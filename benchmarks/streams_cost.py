"""What the stream ledger costs a session, with other sessions open in the process.

Every close asks the ledger for its session's streams twice (before upstream's close runs,
and at its end), and every STT stream is given its session as it opens. This opens and
closes healthy sessions at the floor with the layer while K other started sessions stay
open, and times both in place (``perf_counter`` around the layer's ``streams_of`` and
``register``): microseconds per close, and the median STT stream open, by K. There is no
vanilla column: vanilla has no ledger. ``run.py`` gives the close's ratios against vanilla.

    .venv/bin/python benchmarks/streams_cost.py [closes] [K ...]   # default 50 closes, K = 0 10 30
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from benchlib.common import close_session, open_session, quiet_logs, set_mode

from livekit_safeclose import streams

WARMUP = 10


async def _per_close(others: int, closes: int) -> tuple[float, float, float]:
    """(microseconds in ``streams_of`` per close, calls per close, median microseconds of
    an STT stream's ``register``) with ``others`` open."""
    spent = [0.0, 0.0]
    opens: list[float] = []
    original, register = streams.streams_of, streams.register

    def timed(session: Any) -> list[streams.OpenStream]:
        t = time.perf_counter()
        try:
            return original(session)
        finally:
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    def timed_register(stream: Any, kind: str, session: Any = None) -> None:
        t = time.perf_counter()
        try:
            register(stream, kind, session)
        finally:
            if kind == "stt":
                opens.append(time.perf_counter() - t)

    held = [await open_session(None, turn=False, transcript_timeout=0.0) for _ in range(others)]
    for _ in range(WARMUP):
        await close_session(await open_session(None, transcript_timeout=0.0), 5.0)
    streams.streams_of = timed  # type: ignore[assignment]
    streams.register = timed_register
    try:
        for _ in range(closes):
            await close_session(await open_session(None, transcript_timeout=0.0), 5.0)
    finally:
        streams.streams_of, streams.register = original, register  # type: ignore[assignment]
        for opened in held:
            await close_session(opened, 5.0)
    return spent[0] / closes * 1e6, spent[1] / closes, statistics.median(opens) * 1e6 if opens else 0.0


async def main(closes: int, ks: list[int]) -> None:
    quiet_logs()
    set_mode("layer")
    print(
        "| other sessions open | streams_of, us per close | calls per close | STT stream open, us (median) |"
    )
    print("| ---: | ---: | ---: | ---: |")
    for k in ks:
        us, calls, opened = await _per_close(k, closes)
        print(f"| {k} | {us:.1f} | {calls:.0f} | {opened:.1f} |")
    set_mode("vanilla")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(args[0] if args else 50, args[1:] or [0, 10, 30]))
