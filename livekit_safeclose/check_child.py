"""The child side of ``livekit-safeclose check``: one scenario, in one mode, in this process.

``check`` starts one such child per scenario and mode under a hard kill bound (a vanilla
hang must never hang the command); the child prints its outcome as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Coroutine
from dataclasses import asdict
from typing import Any, TypeVar

T = TypeVar("T")


def _run_untorn(coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` in a new event loop that is not torn down after it (asyncio.run's teardown
    cancels every task left, and a vanilla await cycle, a tool closing its own activity,
    makes Task.cancel() recurse until RecursionError after the run already counted it).
    The caller exits the process without interpreter teardown."""
    return asyncio.new_event_loop().run_until_complete(coro)


def run_one(args: argparse.Namespace) -> int:
    """The child side: run one scenario in one mode and print its outcome as JSON."""
    import logging

    logging.disable(logging.CRITICAL)  # the table is the output; the children stay quiet
    from .testing.scenarios import SCENARIOS, run_scenario
    from .testing.scenarios.runner import vanilla_limit

    # a control (no hang expected) gets the full bound on vanilla too
    hangs = SCENARIOS[args.scenario].vanilla_hangs

    async def main() -> dict[str, Any]:
        out = await run_scenario(
            args.scenario,
            patched=args.mode == "layer",
            drain_timeout=args.drain_timeout,
            close_timeout=args.close_timeout,
            # where even a healthy close waits a fixed 2 s for the transcript, that is added
            limit=vanilla_limit(args.vanilla_limit) if args.mode == "vanilla" and hangs else None,
        )
        d = asdict(out)
        d["report"] = out.report.to_dict() if out.report is not None else None
        d["clean"] = out.clean
        return d

    print(json.dumps(_run_untorn(main())), flush=True)
    return 0


def run_e2e(args: argparse.Namespace) -> int:
    """The child side of ``--e2e``: one real-socket scenario against a stand-in provider
    server started in this process, with the server's own connection counts."""
    import logging

    logging.disable(logging.CRITICAL)
    from .testing.e2e import E2E_SCENARIOS, run_e2e_scenario
    from .testing.standins import ProviderServer

    scenario, _, stt_kind = args.scenario.partition("@")
    hangs = E2E_SCENARIOS[scenario].vanilla_hangs
    if E2E_SCENARIOS[scenario].fallback is not None:
        return _run_fallback(args)

    async def main() -> dict[str, Any]:
        with ProviderServer() as server:
            out = await run_e2e_scenario(
                scenario,
                patched=args.mode == "layer",
                server=server,
                stt=stt_kind or "inference_stt",
                drain_timeout=args.drain_timeout,
                close_timeout=args.close_timeout,
                limit=args.vanilla_limit if args.mode == "vanilla" and hangs else None,
            )
        layer = args.mode == "layer"
        open_after = out.stt_open_after if layer else out.stt_open_at_close
        open_after += out.realtime_open_after if layer else out.realtime_open_at_close
        tasks_left, mcp = out.tasks_left, out.mcp
        if mcp is not None:
            # the MCP server's side: a live stdio child or an open HTTP connection is open,
            # and its client's tasks are left running
            open_after += int(mcp.child_alive) + mcp.http_open
            tasks_left += mcp.tasks
        return {
            "scenario": args.scenario,
            "closed": out.closed,
            "ms": out.ms,
            "provider_open": open_after,
            "server_stt_open_at_close": out.stt_open_at_close,
            "server_stt_open_after": out.stt_open_after,
            "server_realtime_open_at_close": out.realtime_open_at_close,
            "server_realtime_open_after": out.realtime_open_after,
            "server_clean_closes": out.clean_closes,
            "close_events": out.close_events,
            "tasks_left": tasks_left,
            "tasks_left_names": out.tasks_left_names + (mcp.task_names if mcp is not None else []),
            "clean": out.closed
            and open_after == 0
            and out.close_events == 1
            and tasks_left == 0
            and not out.error
            and (mcp is None or mcp.clean),
            "mcp": asdict(mcp) if mcp is not None else None,
            "error": out.error,
            "report": out.report.to_dict() if out.report is not None else None,
        }

    print(json.dumps(_run_untorn(main())), flush=True)
    return 0


def _run_fallback(args: argparse.Namespace) -> int:
    """The child side of a ``FallbackAdapter`` e2e scenario: the verdict is the failed
    provider's connections a second after the close, and the recovery tasks left."""
    from .testing.e2e import run_fallback_scenario
    from .testing.standins import ProviderServer

    scenario, _, stt_kind = args.scenario.partition("@")

    async def main() -> dict[str, Any]:
        with ProviderServer() as server:
            out = await run_fallback_scenario(
                scenario,
                patched=args.mode == "layer",
                server=server,
                primary=stt_kind or "deepgram_stt",
                drain_timeout=args.drain_timeout,
                close_timeout=args.close_timeout,
            )
        return out.as_row(args.scenario)

    print(json.dumps(_run_untorn(main())), flush=True)
    return 0
