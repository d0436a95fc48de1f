"""Benchmarks: vanilla livekit-agents vs livekit-safeclose, measured in the same run.

    python benchmarks/run.py            # full run (~10 min on 2 cores)
    python benchmarks/run.py --quick    # short run (< 90 s)
    python benchmarks/run.py --only latency,quiet

Sections: ``latency`` (healthy close), ``forced`` (forced close per hang class),
``churn`` (soak), ``quiet`` (loop wake-ups after close), ``provider`` (server-side STT
connections over real sockets, drawn to a PNG). Each section (and mode, where one
mode's leftovers could skew the other) runs in a child process of its own under a hard
kill bound. Prints a Markdown table; writes the JSON (and the PNG next to it) to ``--out``:
by default ``results/latest.json`` for a full run (committed), and for a partial run
(``--quick`` or ``--only``) ``results/partial/<sections>[-quick].json`` (ignored by git), so
a partial run never overwrites the committed full-run results.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
SECTIONS: dict[str, tuple[str, ...]] = {
    # latency interleaves both modes in one process; the others get a process per mode
    "latency": ("both",),
    "forced": ("layer", "vanilla"),
    "churn": ("layer", "vanilla"),
    "quiet": ("layer", "vanilla"),
    "provider": ("layer", "vanilla"),
}
#: sections whose modes never share a process: RSS growth is only comparable from a fresh heap
ALWAYS_ISOLATED = {"churn"}
KILL_AFTER = {"quick": 150.0, "full": 1200.0}
PNG_NAME = "provider_connections.png"
#: the committed results of the last full run (README's Performance table comes from it)
FULL_RUN = HERE / "results" / "latest.json"
#: where partial runs write (ignored by git)
PARTIAL_DIR = HERE / "results" / "partial"
TOLERANCE_MS = 50.0
RATIO_TARGET = 1.05
#: the layer's fixed cost: a healthy close with no final-transcript wait
FLOOR_RATIO_TARGET = 1.10
RSS_TARGET_MB = 5.0


# -- child side ------------------------------------------------------------------------


def _child(section: str, mode: str, quick: bool, out: str) -> NoReturn:
    sys.path.insert(0, str(HERE))
    from benchlib.common import quiet_logs

    quiet_logs()
    mod: Any = importlib.import_module(f"benchlib.{section}")
    runner = asyncio.Runner(loop_factory=getattr(mod, "loop_factory", None))
    modes = mode.split(",")
    results = {m: runner.run(mod.run(m, quick)) for m in modes}
    Path(out).write_text(json.dumps(results[mode] if len(modes) == 1 else results))
    sys.stdout.flush()
    sys.stderr.flush()
    # no loop teardown: asyncio's would cancel and await every leftover task, and a vanilla
    # await cycle makes Task.cancel() recurse until RecursionError, while a zombie never ends
    os._exit(0)


# -- parent side -----------------------------------------------------------------------


def _spawn(section: str, mode: str, quick: bool) -> dict[str, Any]:
    bound = KILL_AFTER["quick" if quick else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", section, "--mode", mode,
               "--child-out", str(out)] + (["--quick"] if quick else [])  # fmt: skip
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=bound)
        except subprocess.TimeoutExpired:
            return {"error": f"killed after {bound:.0f} s"}
        wall = round(time.monotonic() - t0, 1)
        if proc.returncode != 0 or not out.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            return {"error": tail or f"exit {proc.returncode}", "wall_s": wall}
        result: dict[str, Any] = json.loads(out.read_text())
        result["wall_s"] = wall
        return result


def _run_sections(names: list[str], quick: bool) -> dict[str, Any]:
    """A child per section and mode; ``--quick`` runs a section's two modes in one child
    (layer first, its leftovers released before vanilla starts) to save start-ups, except
    for the churn, whose RSS numbers need a fresh process each."""
    results: dict[str, Any] = {}
    for name in names:
        modes = SECTIONS[name]
        merge = quick and len(modes) > 1 and name not in ALWAYS_ISOLATED
        batches = [",".join(modes)] if merge else list(modes)
        for batch in batches:
            print(f"[{name}/{batch}] running ...", file=sys.stderr, flush=True)
            res = _spawn(name, batch, quick)
            note = f"error: {res['error']}" if "error" in res else f"{res['wall_s']} s"
            print(f"[{name}/{batch}] {note}", file=sys.stderr, flush=True)
            if batch == "both":
                results[name] = res
            elif "," in batch:
                results[name] = {m: res if "error" in res else res[m] for m in modes}
                results[name]["wall_s"] = res.get("wall_s")
            else:
                results.setdefault(name, {})[batch] = res
    return results


def _fmt(x: Any, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.1f}{unit}" if abs(x) >= 10 else f"{x:.2f}{unit}"
    return f"{x}{unit}"


def _met(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def _signed(x: float) -> str:
    return f"{x:+.1f}"


Row = tuple[str, str, str, str, str]


def _latency_rows(r: dict[str, Any]) -> list[Row]:
    if "error" in r:
        return [("healthy close", "error", "error", "", r["error"][:60])]
    v, lay, ratio = r["vanilla"], r["layer"], r["ratios"]
    n, wait = r["sessions_per_mode"], r["transcript_timeout_s"]
    rows: list[Row] = [
        (f"healthy close median, ms (n={n} each, transcript wait {wait * 1000:.0f} ms)", _fmt(v["median_ms"]),
         _fmt(lay["median_ms"]), f"layer/vanilla <= {RATIO_TARGET}",
         f"{ratio['median']:.3f} {_met(ratio['median'] <= RATIO_TARGET)}"),
        ("healthy close p99, ms", _fmt(v["p99_ms"]), _fmt(lay["p99_ms"]),
         f"layer/vanilla <= {RATIO_TARGET}", f"{ratio['p99']:.3f} {_met(ratio['p99'] <= RATIO_TARGET)}"),
        ("healthy close max, ms", _fmt(v["max_ms"]), _fmt(lay["max_ms"]), "(reported)", f"{ratio['max']:.3f}"),
    ]  # fmt: skip
    floor = r.get("floor")
    if floor is not None:
        fv, fl, fr = floor["vanilla"], floor["layer"], floor["ratios"]
        rows += [
            ("healthy close at the floor (no transcript wait: the fixed cost) median, ms", _fmt(fv["median_ms"]),
             _fmt(fl["median_ms"]), f"layer/vanilla <= {FLOOR_RATIO_TARGET}",
             f"{fr['median']:.3f} {_met(fr['median'] <= FLOOR_RATIO_TARGET)}"),
            ("healthy close at the floor p99, ms", _fmt(fv["p99_ms"]), _fmt(fl["p99_ms"]),
             f"layer/vanilla <= {FLOOR_RATIO_TARGET}", f"{fr['p99']:.3f} {_met(fr['p99'] <= FLOOR_RATIO_TARGET)}"),
        ]  # fmt: skip
        bare = floor.get("skeleton")
        if bare is not None:
            br = bare["ratios"]
            rows.append(
                ("floor with the close's bare shape only (benchlib/skeleton.py) median / p99, ms",
                 f"{_fmt(fv['median_ms'])} / {_fmt(fv['p99_ms'])}", f"{_fmt(bare['median_ms'])} / {_fmt(bare['p99_ms'])}",
                 "(reported: the design's least)", f"{br['median']:.3f} / {br['p99']:.3f}"),
            )  # fmt: skip
    forced = lay["forced"] + (floor["layer"]["forced"] if floor is not None else 0)
    rows.append(("healthy closes forced by the layer", "-", str(forced), "0", _met(forced == 0)))
    return rows


def _forced_rows(r: dict[str, Any]) -> list[Row]:
    lay, van = r.get("layer", {}), r.get("vanilla", {})
    if "error" in lay or "error" in van:
        return [
            (
                "forced close",
                _fmt(van.get("error", "ok"))[:40],
                _fmt(lay.get("error", "ok"))[:40],
                "",
                "error",
            )
        ]
    rows = lay["rows"]
    hung = sum(not x["closed"] for x in van["rows"])
    worst = max(rows, key=lambda x: x["over_close_ms_p99"])
    drains = [x for x in rows if x["over_drain_ms_p99"] is not None]
    wdrain = max(drains, key=lambda x: x["over_drain_ms_p99"]) if drains else None
    clean = sum(x["clean"] for x in rows)
    total = sum(x["k"] for x in rows)
    n, k = len(rows), lay["k"]
    out: list[Row] = [
        (f"forced close, worst p99 over close_timeout={lay['close_timeout_s']} s, from the escalation for a graceful close ({n} scenarios x K={k}), ms",
         f"{hung}/{len(van['rows'])} never closed (waited {van['wait_s']} s)",
         f"{_signed(worst['over_close_ms_p99'])} ({worst['scenario']})",
         f"<= +{TOLERANCE_MS:.0f}", _met(worst["over_close_ms_p99"] <= TOLERANCE_MS)),
    ]  # fmt: skip
    if wdrain is not None:
        out.append(
            (f"drain phase end, worst p99 over drain_timeout={lay['drain_timeout_s']} s, + the unwind grace where a task swallowed the cancellation ({len(drains)} scenarios), ms",
             "never ends", f"{_signed(wdrain['over_drain_ms_p99'])} ({wdrain['scenario']})",
             f"<= +{TOLERANCE_MS:.0f}", _met(wdrain["over_drain_ms_p99"] <= TOLERANCE_MS))
        )  # fmt: skip
    out.append(("forced closes that were clean (closed, 1 close event, 0 provider conns)", "0", f"{clean}/{total}",
                f"{total}/{total}", _met(clean == total)))  # fmt: skip
    return out


def _half(res: dict[str, Any]) -> str:
    h = res.get("rss_growth_second_half")
    return "n/a" if not h else f"{_fmt(h['mb'])} ({h['from']}->{h['to']})"


def _alive(end: dict[str, Any]) -> str:
    a = end.get("closed_sessions_alive")
    return "-" if a is None else f"{a['held']} (+{a['zombies_sessions']})"


def _churn_rows(r: dict[str, Any], quick: bool) -> list[Row]:
    lay, van = r.get("layer", {}), r.get("vanilla", {})
    if "error" in lay or "error" in van:
        return [("churn", _fmt(van.get("error", "ok"))[:40], _fmt(lay.get("error", "ok"))[:40], "", "error")]
    le, ve = lay["end"], van["end"]

    def pair(key: str) -> tuple[str, str]:
        return str(ve[key]), str(le[key])

    want = 200 if quick else 2000

    return [
        ("churn: sessions (with a fault)", f"{van['sessions']} ({van['faults']})", f"{lay['sessions']} ({lay['faults']})",
         f">= {want} layer", _met(lay["sessions"] >= want)),
        ("churn: closes that did not return in the wait", f"{van['not_closed']} (wait {van['close_wait_s']} s)",
         f"{lay['not_closed']} (wait {lay['close_wait_s']} s)", "0 layer", _met(lay["not_closed"] == 0)),
        ("churn: open streams at end (open_streams())", *pair("open_streams"), "0", _met(le["open_streams"] == 0)),
        ("churn: provider connections open at end (fake ledger)", *pair("provider_open"), "0",
         _met(le["provider_open"] == 0)),
        ("churn: live tasks at end, zombies excluded", *pair("tasks"), "0", _met(le["tasks"] == 0)),
        ("churn: zombie tasks at end (swallowed cancellation)", *pair("zombies"), "(reported)", "-"),
        ("churn: pending timers, growth after warm-up", str(van["timer_growth"]), str(lay["timer_growth"]), "(reported)", "-"),
        ("churn: open fds, growth after warm-up", str(van["fd_growth"]), str(lay["fd_growth"]), "(reported)", "-"),
        ("churn: RSS growth after warm-up, MB (zombies still parked)", _fmt(van["rss_growth_mb"]),
         _fmt(lay["rss_growth_mb"]), f"< {RSS_TARGET_MB:.0f} layer" + (" (full run)" if quick else ""),
         "-" if quick else _met(lay["rss_growth_mb"] < RSS_TARGET_MB)),
        ("churn: RSS growth over the 2nd half of the sessions, MB", _half(van), _half(lay), "(reported)", "-"),
        ("churn: RSS growth after releasing zombies, MB", _fmt(van["rss_growth_after_release_mb"]),
         _fmt(lay["rss_growth_after_release_mb"]), "(reported)", "-"),
        ("churn: Python memory blocks, growth after warm-up (at end / after release)",
         f"{van['py_blocks_growth']} / {van['py_blocks_growth_after_release']}",
         f"{lay['py_blocks_growth']} / {lay['py_blocks_growth_after_release']}", "(reported)", "-"),
        ("churn: sessions still in memory at end", str(ve["sessions_alive"]), str(le["sessions_alive"]), "(reported)", "-"),
        ("churn: closed sessions still alive after gc, zombies' sessions aside (+ held by a zombie)",
         _alive(ve), _alive(le), "0 layer", _met(le.get("closed_sessions_alive", {}).get("held", 1) == 0)),
        ("churn: RSS growth after releasing zombies and malloc_trim(0), MB", _fmt(van.get("rss_growth_after_trim_mb")),
         _fmt(lay.get("rss_growth_after_trim_mb")), "(reported)", "-"),
    ]  # fmt: skip


def _quiet_rows(r: dict[str, Any]) -> list[Row]:
    lay, van = r.get("layer", {}), r.get("vanilla", {})
    if "error" in lay or "error" in van:
        return [("quiet", _fmt(van.get("error", "ok"))[:40], _fmt(lay.get("error", "ok"))[:40], "", "error")]
    s = lay["baseline"]["seconds"]
    return [
        (f"loop wake-ups in {s:.0f} s before any session (baseline)", str(van["baseline"]["wakeups"]),
         str(lay["baseline"]["wakeups"]), "(reported)", "-"),
        (f"loop wake-ups in {s:.0f} s after all {lay['sessions']} sessions ({lay['faulty']} faulty) closed",
         str(van["after_close"]["wakeups"]), str(lay["after_close"]["wakeups"]), "(reported)", "-"),
        ("  of which caused by the closed sessions", str(van["attributable_wakeups"]),
         str(lay["attributable_wakeups"]), "0 layer", _met(lay["attributable_wakeups"] == 0)),
    ]  # fmt: skip


def _provider_rows(r: dict[str, Any], png: str | None) -> list[Row]:
    lay, van = r.get("layer", {}), r.get("vanilla", {})
    if "error" in lay or "error" in van:
        return [
            ("provider", _fmt(van.get("error", "ok"))[:40], _fmt(lay.get("error", "ok"))[:40], "", "error")
        ]
    return [
        (f"real sockets: peak concurrent STT connections ({lay['sessions']} sessions, {lay['stuck']} stuck)",
         str(van["peak_stt_open"]), str(lay["peak_stt_open"]), "<= 1 layer", _met(lay["peak_stt_open"] <= 1)),
        ("real sockets: STT connections still open when the churn ended", str(van["stt_open_at_churn_end"]),
         str(lay["stt_open_at_churn_end"]), "0 layer", _met(lay["stt_open_at_churn_end"] == 0)),
        ("real sockets: connections over time (PNG)", "", "", "", png or "not drawn (matplotlib missing)"),
    ]  # fmt: skip


def _forced_detail(r: dict[str, Any]) -> list[str]:
    lay, van = r.get("layer", {}), r.get("vanilla", {})
    if "rows" not in lay or "rows" not in van:
        return []
    vmap = {x["scenario"]: x for x in van["rows"]}
    lines = [
        f"| scenario | vanilla (waited {van['wait_s']} s) | close ms p99 | over close_timeout={lay['close_timeout_s']} s "
        f"(from the escalation) | drain end ms p99 | over drain_timeout={lay['drain_timeout_s']} s (+ grace: zombie) | clean |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in lay["rows"]:
        v = vmap.get(x["scenario"], {})
        vcell = "closed" if v.get("closed") else "never closed"
        lines.append(
            f"| {x['scenario']} | {vcell} | {x['close_ms_p99']:.0f} | {_signed(x['over_close_ms_p99'])} | "
            f"{_fmt(x['drain_end_ms_p99'])} | "
            f"{_signed(x['over_drain_ms_p99']) if x['over_drain_ms_p99'] is not None else 'n/a'}"
            f"{' (zombie)' if x.get('zombie') else ''} | "
            f"{x['clean']}/{x['k']} |"
        )
    return lines


def _table(results: dict[str, Any], png: str | None, quick: bool) -> str:
    rows: list[Row] = []
    if "latency" in results:
        rows += _latency_rows(results["latency"])
    if "forced" in results:
        rows += _forced_rows(results["forced"])
    if "churn" in results:
        rows += _churn_rows(results["churn"], quick)
    if "quiet" in results:
        rows += _quiet_rows(results["quiet"])
    if "provider" in results:
        rows += _provider_rows(results["provider"], png)
    lines = ["| measure | vanilla | layer | target | result |", "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    detail = _forced_detail(results.get("forced", {}))
    if detail:
        lines += ["", "Forced close per hang class (layer: p99 over K runs):", "", *detail]
    return "\n".join(lines)


def _plot(provider: dict[str, Any], path: Path) -> str | None:
    """Both modes' server-side STT connection counts over time, in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for mode, color in (("vanilla", "tab:red"), ("layer", "tab:green")):
        res = provider.get(mode, {})
        if "samples" not in res:
            continue
        ts = [t for t, _ in res["samples"]]
        ns = [n for _, n in res["samples"]]
        label = f"{mode} ({res['sessions']} sessions, {res['stuck']} with a stuck tool)"
        ax.step(ts, ns, where="post", color=color, label=label)
        ax.axvline(res["churn_returned_at_s"], color=color, linestyle=":", alpha=0.6)
    ax.set_xlabel("seconds since the churn started")
    ax.set_ylabel("concurrent STT connections (server side)")
    ax.set_title(
        "Provider's view of a session churn with stuck tools (dotted: churn ended, leftovers released)"
    )
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _targets(results: dict[str, Any], quick: bool) -> dict[str, bool]:
    """Every target of the table as one boolean each (the JSON's ``targets``); the RSS
    target needs the full run's warm-up and sample, so a quick run does not judge it."""
    out: dict[str, bool] = {}
    lat = results.get("latency", {})
    if "ratios" in lat:
        out["latency_median_ratio"] = lat["ratios"]["median"] <= RATIO_TARGET
        out["latency_p99_ratio"] = lat["ratios"]["p99"] <= RATIO_TARGET
        out["latency_no_forced"] = lat["layer"]["forced"] == 0
        if "floor" in lat:
            out["latency_floor_median_ratio"] = lat["floor"]["ratios"]["median"] <= FLOOR_RATIO_TARGET
            out["latency_floor_p99_ratio"] = lat["floor"]["ratios"]["p99"] <= FLOOR_RATIO_TARGET
            out["latency_no_forced"] = out["latency_no_forced"] and lat["floor"]["layer"]["forced"] == 0
    lay = results.get("forced", {}).get("layer", {})
    if "rows" in lay:
        out["forced_close_bound"] = all(x["over_close_ms_p99"] <= TOLERANCE_MS for x in lay["rows"])
        out["forced_drain_bound"] = all(
            x["over_drain_ms_p99"] is None or x["over_drain_ms_p99"] <= TOLERANCE_MS for x in lay["rows"]
        )
    ch = results.get("churn", {}).get("layer", {})
    if "end" in ch:
        out["churn_streams"] = ch["end"]["open_streams"] == 0
        out["churn_tasks"] = ch["end"]["tasks"] == 0
        if not quick:
            out["churn_rss"] = ch["rss_growth_mb"] < RSS_TARGET_MB
    q = results.get("quiet", {}).get("layer", {})
    if "attributable_wakeups" in q:
        out["quiet"] = q["attributable_wakeups"] == 0
    return out


def default_out(names: list[str], quick: bool) -> Path:
    """The full run writes the committed ``results/latest.json`` (its PNG next to it); a
    partial one (``--quick``, or only some sections) writes under ``results/partial/``, named
    by what it ran, so it never overwrites the full run's files."""
    if not quick and names == list(SECTIONS):
        return FULL_RUN
    return PARTIAL_DIR / ("-".join(names) + ("-quick" if quick else "") + ".json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (< 90 s) with small samples")
    p.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument(
        "--out",
        default=None,
        help="the JSON to write (PNG next to it); default: results/latest.json for a full run, "
        "results/partial/<sections>[-quick].json for a partial one",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, args.mode, args.quick, args.child_out)

    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    partial = args.quick or names != list(SECTIONS)
    out = Path(args.out) if args.out else default_out(names, args.quick)
    if partial and out.resolve() == FULL_RUN.resolve():
        p.error(f"a partial run (--quick or --only) never writes {FULL_RUN}: the committed full-run results")
    t0 = time.monotonic()
    results = _run_sections(names, args.quick)
    png = _plot(results["provider"], out.parent / PNG_NAME) if "provider" in results else None
    wall = round(time.monotonic() - t0, 1)
    from importlib.metadata import version

    doc = {
        "meta": {
            "quick": args.quick,
            "sections": names,
            "wall_s": wall,
            "python": platform.python_version(),
            "livekit_agents": version("livekit-agents"),
            "livekit_safeclose": version("livekit-safeclose"),
            "cpus": os.cpu_count(),
            "machine": platform.platform(),
            "png": png,
        },
        "targets": _targets(results, args.quick),
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(_table(results, png, args.quick))
    print(f"\nwall time {wall} s; JSON: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
