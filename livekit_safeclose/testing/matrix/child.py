"""The side of the version matrix that runs inside one release's venv.

``python -m livekit_safeclose.testing.matrix.child --shard I --shards N`` prints one JSON
document: the release, the forms the compatibility table detected, what ``install()`` does
there (which parts install, which are refused and why), and, for its share of the
catalogue, each scenario run on vanilla and with the layer, in this one process (a lean run:
no subprocess per scenario; the parent holds a hard kill bound over the whole process).

Bounds follow the release's shape, not its version: where the close waits a fixed time for
the final transcript (no ``session_close_transcript_timeout``), that wait is added to the
close bound and to the vanilla limit, since even a healthy close takes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from . import verdicts

DRAIN, CLOSE, GRACEFUL = 0.5, 3.0, 2.0
#: a scenario run that does not come back within its own bound plus this is recorded as an
#: error (the parent's kill bound is the last resort); generous, for a loaded machine
_RUN_GUARD = 60.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def install_check() -> dict[str, Any]:
    """``install()`` with every part asked for (the defaults plus the opt-in second-signal
    close): what installs, what is refused by name and why, and the warnings it logs."""
    import livekit_safeclose as lsc
    from livekit_safeclose import compat
    from livekit_safeclose.options import WORKER_PARTS, Options

    records = _Records()
    logger = logging.getLogger("livekit.agents.safeclose")
    logger.addHandler(records)
    out: dict[str, Any] = {"shapes": compat.detect_shapes()}
    try:
        lsc.install(force_close_on_second_signal=True)
    except lsc.IncompatibleLivekitAgents as exc:
        return {**out, "ok": False, "error": str(exc), "parts": [], "refused": {}, "warnings": []}
    finally:
        logger.removeHandler(records)
    wanted = Options(force_close_on_second_signal=True).parts()
    out |= {
        "ok": True,
        "error": "",
        "parts": sorted(lsc.installed_parts()),
        "refused": {p: ps for p, ps in compat.problems(WORKER_PARTS).items() if p in wanted},
        "warnings": records.messages,
    }
    lsc.uninstall()
    return out


def bounds() -> dict[str, float]:
    """The bounds this release's runs use (see the module doc)."""
    from ..features import close_transcript_wait
    from ..scenarios import TRANSCRIPT_TIMEOUT
    from ..scenarios.runner import vanilla_limit

    extra = max(0.0, close_transcript_wait(TRANSCRIPT_TIMEOUT) - TRANSCRIPT_TIMEOUT)
    return {
        "drain_timeout": DRAIN,
        "close_timeout": round(CLOSE + extra, 2),
        "graceful_timeout": GRACEFUL,
        "vanilla_limit": round(vanilla_limit(), 2),
        "transcript_wait": close_transcript_wait(TRANSCRIPT_TIMEOUT),
    }


def _summary(out: Any, *, replayed: bool) -> dict[str, Any]:
    report = out.report
    return {
        "closed": out.closed,
        "ms": out.ms,
        "provider_open": out.provider_open,
        "streams_open": out.streams_open,
        "close_events": out.close_events,
        "tasks_left": out.tasks_left,
        "clean": out.clean,
        "error": out.error,
        # a replayed fuzz schedule lists its broken invariants in ``error``: findings (on
        # vanilla, the bug), not a broken run
        "broken": bool(out.error) and not replayed,
        "forced": bool(report.forced) if report is not None else None,
        "report_ms": report.duration_ms if report is not None else None,
    }


async def _guarded(coro: Any, limit: float, *, replayed: bool) -> dict[str, Any]:
    try:
        return _summary(await asyncio.wait_for(coro, limit + _RUN_GUARD), replayed=replayed)
    except Exception as exc:  # a broken run is a result, not the end of the shard
        error = f"{type(exc).__name__}: {exc}"[:300]
        return {"closed": False, "clean": False, "error": error, "broken": True}


async def run_one(sid: str, b: dict[str, float]) -> dict[str, Any]:
    """One scenario on vanilla, then with the layer."""
    from ..scenarios import SCENARIOS, run_scenario

    sc = SCENARIOS[sid]
    row: dict[str, Any] = {"id": sid}
    if (reason := sc.not_applicable()) is not None:
        return {**row, "verdict": "n/a", "reason": reason}
    bound = b["close_timeout"] + (b["graceful_timeout"] if sc.path == "graceful" else 0.0)
    t0 = time.monotonic()
    kw = {"drain_timeout": b["drain_timeout"], "close_timeout": b["close_timeout"]}
    kw["graceful_timeout"] = b["graceful_timeout"]
    replayed = sc.schedule is not None
    vanilla_limit = b["vanilla_limit"] if sc.vanilla_hangs else None
    row["vanilla"] = await _guarded(
        run_scenario(sc, patched=False, limit=vanilla_limit, **kw), bound, replayed=replayed
    )
    row["layer"] = await _guarded(run_scenario(sc, patched=True, **kw), bound, replayed=replayed)
    row["bound_ms"] = round(bound * 1000)
    row["vanilla_state"] = verdicts.vanilla_state(row["vanilla"], leaves_task=sc.leaves_task)
    row["verdict"] = verdicts.verdict(sc, row["vanilla"], row["layer"], row["bound_ms"])
    row["wall_s"] = round(time.monotonic() - t0, 2)
    return row


async def run_shard(ids: list[str]) -> list[dict[str, Any]]:
    from ..scenarios import load_vad

    b = bounds()
    load_vad()  # once, before the first run's clock starts
    return [await run_one(sid, b) for sid in ids]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livekit_safeclose.testing.matrix.child")
    parser.add_argument("--scenarios", default="lean", help="lean, all, or comma-separated ids")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    from livekit_safeclose import compat

    out: dict[str, Any] = {"release": compat.installed_version(), "python": sys.version.split()[0]}
    t0 = time.monotonic()
    if args.shard == 0:
        out["install"] = install_check()
        out["bounds"] = bounds()
    logging.disable(logging.CRITICAL)  # the runs' own warnings (forced closes) stay out
    if out.get("install", {}).get("ok", True):
        ids = verdicts.select(args.scenarios)[args.shard :: args.shards]
        # no loop teardown (asyncio.run's): it cancels every task a run left, and a vanilla
        # await cycle (a tool closing its own activity) makes Task.cancel() recurse until
        # RecursionError, after the scenario already counted what was left
        out["scenarios"] = asyncio.new_event_loop().run_until_complete(run_shard(ids))
    out["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # what the runs left (zombies, a vanilla cycle) is not torn down either
