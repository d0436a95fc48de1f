"""Which scenarios a matrix run takes, and what each pair of runs says.

A hang scenario is *fixed* on a release when vanilla shows the bug (the close does not end
within the vanilla limit, or ends leaving a provider stream open, no close event, or tasks
running) and the layer closes it clean within the bound: 0 provider streams open, one close
event, nothing left running but the scenario's own reported zombies.
"""

from __future__ import annotations

from typing import Any

#: slack over the close bound for scheduling noise (several releases run at once)
MARGIN_MS = 250


def select(which: str) -> list[str]:
    """``all``: the whole catalogue; ``lean``: each hang class along its first close path,
    plus every scenario that is not a hang class; else comma-separated ids."""
    from ..scenarios import HANG_CLASSES, SCENARIOS

    if which == "all":
        return list(SCENARIOS)
    if which == "lean":
        expanded = {f"{hc.key}-{p}" for hc in HANG_CLASSES for p in hc.paths}
        firsts = {f"{hc.key}-{hc.paths[0]}" for hc in HANG_CLASSES}
        return [sid for sid in SCENARIOS if sid in firsts or sid not in expanded]
    ids = [s.strip() for s in which.split(",") if s.strip()]
    unknown = [s for s in ids if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
    return ids


def hang_class(sid: str) -> str:
    """The hang class a scenario id expands from (the id itself for the others)."""
    from ..scenarios import HANG_CLASSES

    for hc in HANG_CLASSES:
        if sid.startswith(hc.key + "-") and sid[len(hc.key) + 1 :] in hc.paths:
            return hc.key
    return sid


def vanilla_state(run: dict[str, Any], *, leaves_task: bool) -> str:
    """``hangs``, ``leaks`` (closed, but a provider stream, the close event or a task is
    missing or left, or a replayed schedule's invariant broken), ``closes`` (clean), or
    ``error`` (the run itself broke)."""
    broken = run.get("broken", bool(run.get("error")))
    if not run.get("closed"):
        return "error" if broken else "hangs"
    left = run.get("tasks_left", 0) and not leaves_task
    findings = run.get("error") and not broken
    if run.get("provider_open") or run.get("close_events") != 1 or left or findings:
        return "leaks"
    return "closes"


def layer_ok(run: dict[str, Any], bound_ms: int) -> bool:
    return (
        bool(run.get("clean"))
        and run.get("streams_open", 0) == 0
        and run.get("ms", 1e9) <= bound_ms + MARGIN_MS
    )


def verdict(sc: Any, vanilla: dict[str, Any], layer: dict[str, Any], bound_ms: int) -> str:
    """``fixed``, ``no hang on vanilla``, ``ok`` (a control clean on both), ``FAIL`` (the
    layer did not close it clean within the bound), ``vanilla control failed``, or ``error``
    (the vanilla run itself broke: it proves nothing either way)."""
    if not layer_ok(layer, bound_ms):
        return "FAIL"
    state = vanilla_state(vanilla, leaves_task=sc.leaves_task)
    if state == "error":
        return "error"
    if sc.vanilla_hangs or getattr(sc, "vanilla_leaks", False):
        return "fixed" if state in ("hangs", "leaks") else "no hang on vanilla"
    return "ok" if state == "closes" else "vanilla control failed"
