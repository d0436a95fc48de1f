"""Section 5: provider connections over time, over real sockets.

The real LiveKit Inference STT, OpenAI LLM and Inference TTS plugins talk to a stand-in
:class:`ProviderServer`; :func:`run_churn` opens sessions one after another, every other
one with a tool stuck forever (reached through a real LLM tool call), and closes each.
A thread samples the SERVER's count of concurrent STT connections every 50 ms: that is
what a provider bills and rate-limits. No quota is enforced, so vanilla's line shows
every orphaned connection; ``run_churn`` releases whatever is left when it ends, and
sampling goes on for ``TAIL`` seconds after that.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from livekit_safeclose.testing.e2e import run_churn
from livekit_safeclose.testing.standins import ProviderServer

SAMPLE_EVERY = 0.05
DRAIN_TIMEOUT = 0.3
CLOSE_TIMEOUT = 2.0
NO_QUOTA = 1_000_000
#: how long sampling goes on after the churn returned (and released its leftovers)
TAIL = 1.0


async def run(mode: str, quick: bool) -> dict[str, Any]:
    sessions = 4 if quick else 16
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    with ProviderServer() as server:
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((round(time.monotonic() - t0, 3), server.open_connections("inference_stt")))
                stop.wait(SAMPLE_EVERY)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            out = await run_churn(
                patched=mode == "layer",
                server=server,
                sessions=sessions,
                quota=NO_QUOTA,
                drain_timeout=DRAIN_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
            )
            churn_end = round(time.monotonic() - t0, 3)
            await asyncio.sleep(TAIL)  # the drop once run_churn released what was stuck
        finally:
            stop.set()
            sampler.join(1.0)
    counts = [c for _, c in samples]
    return {
        "sessions": sessions,
        "stuck": sum(out.stuck),
        "closed": sum(out.closed),
        "connected": sum(out.connected),
        "close_wait_s": CLOSE_TIMEOUT + 1.0 if mode == "layer" else 0.5,
        "layer_options": {"drain_timeout": DRAIN_TIMEOUT, "close_timeout": CLOSE_TIMEOUT}
        if mode == "layer"
        else None,
        "sample_every_s": SAMPLE_EVERY,
        "peak_stt_open": max(counts, default=0),
        "stt_open_at_churn_end": out.stt_open_end,
        "churn_s": round(out.ms / 1000, 1),
        "churn_returned_at_s": churn_end,
        "samples": samples,
    }
