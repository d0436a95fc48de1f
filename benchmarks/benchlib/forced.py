"""Section 2: forced close time per hang class (every catalogue scenario that hangs on
vanilla), measured against the configured bounds.

Two numbers per scenario, because the layer's close is not one wait: the drain bound is
followed by the final-transcript wait and the model teardown.

* whole close: from the close request until it returned, against ``close_timeout``;
* drain: from the start of the close (or of the escalation, for a graceful close a
  forced one joined) until the drain phase ended, against ``drain_timeout``: the time the
  close report gives for the start of the ``models`` phase (``report.phases``), minus
  ``report.escalated_ms``. A close during ``start()`` has no activity to drain: no figure.

Both are measured from where their bound starts: a graceful close's bounds start at its
escalation (``graceful_timeout`` passed, or a forced close joined), so its close time is
taken from there too (``close_from_escalation``), and every close's time from its own request
(the report's duration: an ``EndCallTool`` requests the close after its bounded goodbye). A task that swallows the cancellation (a
zombie) holds the drain until the unwind grace the layer gives it before quarantining it:
for those scenarios the drain target adds that grace (``ZOMBIE_DRAIN_GRACE``).

Vanilla gets one run per scenario and a fixed wait: it never closes.
"""

from __future__ import annotations

from typing import Any

from livekit_safeclose.bounded_close import EMIT_RESERVE, SWEEP_RESERVE, UNWIND_GRACE
from livekit_safeclose.testing.scenarios import SCENARIOS, run_scenario

from .common import pct

DRAIN_TIMEOUT = 0.5
CLOSE_TIMEOUT = 2.0
#: the unwind grace a task cancelled at the drain bound gets before it counts as a zombie:
#: a quarter of what is left of the teardown bound (``BoundedClose.drain_grace``), at most
#: ``UNWIND_GRACE``
ZOMBIE_DRAIN_GRACE = min(UNWIND_GRACE, (CLOSE_TIMEOUT - SWEEP_RESERVE - EMIT_RESERVE - DRAIN_TIMEOUT) / 4)


def drain_end_ms(report: Any) -> float | None:
    """When the drain phase ended, from the start of the close or its escalation."""
    models = report.phases.get("models")
    if models is None:
        return None
    return float(models) - float(report.escalated_ms or 0.0)


def _scenario_ids(quick: bool) -> list[str]:
    ids = [s.id for s in SCENARIOS.values() if s.vanilla_hangs]
    if not quick:
        return ids
    # one path per hang class (and the race/escalation/await-cycle specials)
    seen: set[str] = set()
    out: list[str] = []
    for sid in ids:
        suffix = "-" + SCENARIOS[sid].path
        key = sid.removesuffix(suffix)
        if key not in seen:
            seen.add(key)
            out.append(sid)
    return out


async def run(mode: str, quick: bool) -> dict[str, Any]:
    ids = _scenario_ids(quick)
    if mode == "vanilla":
        wait = 0.5 if quick else 1.0
        rows = []
        for sid in ids:
            out = await run_scenario(sid, patched=False, limit=wait)
            rows.append(
                {"scenario": sid, "closed": out.closed, "ms": out.ms, "provider_open": out.provider_open}
            )
        return {"wait_s": wait, "rows": rows}
    k = 1 if quick else 5
    rows = []
    for sid in ids:
        closes: list[float] = []
        bounded: list[float] = []  # from where the close bound starts (the escalation)
        drains: list[float] = []
        clean = forced = 0
        zombie = False
        steps: list[dict[str, Any]] = []
        for _ in range(k):
            out = await run_scenario(
                sid, patched=True, drain_timeout=DRAIN_TIMEOUT, close_timeout=CLOSE_TIMEOUT
            )
            closes.append(out.ms)
            clean += out.clean
            rep = out.report
            # the close's own time, from its request (an EndCallTool asks for it only after its
            # bounded goodbye), less the graceful part before an escalation
            bounded.append(rep.duration_ms - (rep.escalated_ms or 0.0) if rep is not None else out.ms)
            if rep is not None:
                forced += rep.forced
                zombie = zombie or any(st.swallowed_cancel for st in rep.stuck)
                end = drain_end_ms(rep)
                if end is not None:
                    drains.append(end)
                steps = [{"name": s.name, "ms": s.ms, "outcome": s.outcome} for s in rep.steps]
        rows.append(
            {
                "scenario": sid,
                "path": SCENARIOS[sid].path,
                "k": k,
                "close_ms_p99": round(pct(closes, 99), 1),
                "close_ms_max": round(max(closes), 1),
                "close_from_escalation_ms_p99": round(pct(bounded, 99), 1),
                "over_close_ms_p99": round(pct(bounded, 99) - CLOSE_TIMEOUT * 1000, 1),
                "drain_end_ms_p99": round(pct(drains, 99), 1) if drains else None,
                "zombie": zombie,
                "over_drain_ms_p99": (
                    round(pct(drains, 99) - (DRAIN_TIMEOUT + (ZOMBIE_DRAIN_GRACE if zombie else 0)) * 1000, 1)
                    if drains
                    else None
                ),
                "clean": clean,
                "forced": forced,
                "last_steps": steps,
            }
        )
    return {"drain_timeout_s": DRAIN_TIMEOUT, "close_timeout_s": CLOSE_TIMEOUT, "k": k, "rows": rows}
