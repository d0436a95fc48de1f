"""``livekit-safeclose``: show, on this machine and this livekit-agents, which close
scenarios hang on vanilla and that the layer closes them.

Every scenario runs in its own subprocess (one for vanilla, one with the layer) under a
hard kill bound, so a vanilla hang can never hang the command.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_KILL_MARGIN = 20.0  # seconds past the scenario's own bound before the subprocess is killed
#: more for a real-socket run: it starts real plugins (and MCP servers) and watches after the close
_E2E_KILL_MARGIN = 60.0


def _patterns(only: list[str] | None) -> list[str]:
    return [p.strip() for spec in only or [] for p in spec.split(",") if p.strip()]


def _match(sid: str, pats: list[str]) -> bool:
    return any(fnmatch.fnmatch(sid, p) or sid.startswith(p) for p in pats)


def _e2e_ids() -> list[str]:
    """The real-socket ids (``{scenario}@{stt_kind}``), derived from the e2e catalogue so
    a scenario added there is never missing here."""
    from .testing.e2e import E2E_IDS

    return list(E2E_IDS)


def _scenario_ids(only: list[str] | None, e2e: bool = False) -> tuple[list[str], list[str]]:
    """The catalogue ids and (with ``e2e``) the real-socket ids that ``--only`` selects."""
    from .testing.scenarios import SCENARIOS

    ids, pats = list(SCENARIOS), _patterns(only)
    if not pats and not e2e:
        return ids, []
    known_e2e = _e2e_ids()
    e2e_ids = known_e2e if e2e else []
    if not pats:
        return ids, e2e_ids
    unknown = [p for p in pats if not any(_match(i, [p]) for i in ids + known_e2e)]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(ids + known_e2e)}")
    return [i for i in ids if _match(i, pats)], [i for i in e2e_ids if _match(i, pats)]


#: what ``check`` imports beyond the base install: the scenarios run on the real Silero
#: VAD (the ``testing`` extra); ``--e2e`` adds the real LLM and Deepgram plugins, which no
#: extra but ``dev`` brings (pinned to the livekit-agents line the layer supports)
_TESTING_EXTRA = '"livekit-safeclose[testing]"'
_CHECK_NEEDS = ("livekit.plugins.silero",)
_E2E_NEEDS = {
    "livekit.plugins.openai": '"livekit-plugins-openai>=1.8.0,<1.9"',
    "livekit.plugins.deepgram": '"livekit-plugins-deepgram>=1.8.0,<1.9"',
    # the MCP scenarios run real MCP servers
    "mcp": '"livekit-agents[mcp]>=1.8.0,<1.9"',
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a broken entry
        return False


def _missing_dependencies(e2e: bool) -> str | None:
    """One line saying what to install when ``check`` cannot run here, else None.

    Probed up front: otherwise every scenario's subprocess fails on the same import and
    the cause is buried in the table."""
    missing = [m for m in _CHECK_NEEDS if not _installed(m)]
    missing_e2e = [m for m in _E2E_NEEDS if e2e and not _installed(m)]
    if not missing and not missing_e2e:
        return None
    reqs = ([_TESTING_EXTRA] if missing else []) + [_E2E_NEEDS[m] for m in missing_e2e]
    return (
        f"error: livekit-safeclose check needs {', '.join(missing + missing_e2e)}, which this "
        f"install lacks; run: pip install {' '.join(reqs)}"
    )


def _spawn(
    scenario: str,
    mode: str,
    args: argparse.Namespace,
    child: str = "_run",
    hangs: bool = True,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    # a vanilla run that is not expected to hang gets the layer's bound
    bound = (
        args.close_timeout * 2 + 1.0 if mode == "layer" or not hangs else args.vanilla_limit
    ) + _KILL_MARGIN
    if child == "_run_e2e":
        bound += _E2E_KILL_MARGIN
    cmd = [
        sys.executable, "-m", "livekit_safeclose.cli", child, scenario, "--mode", mode,
        "--drain-timeout", str(args.drain_timeout), "--close-timeout", str(args.close_timeout),
        "--vanilla-limit", str(args.vanilla_limit),
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=bound, env=env or os.environ.copy()
        )
    except subprocess.TimeoutExpired:
        return {"scenario": scenario, "closed": False, "error": f"killed after {bound:.0f} s", "killed": True}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"scenario": scenario, "closed": False, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    out: dict[str, Any] = json.loads(lines[-1])
    out["wall_s"] = round(time.monotonic() - t0, 2)
    return out


def _cell(o: dict[str, Any]) -> str:
    if o.get("error") and not o.get("closed"):
        return f"error: {o['error'][:40]}"
    state = "closed" if o.get("closed") else "HUNG"
    mcp = o.get("mcp")
    wakeups = f", {mcp['attributable']} wake-ups in {mcp['window_s']:.0f} s" if mcp else ""
    return (
        f"{state} {o.get('ms', 0):.0f} ms, {o.get('provider_open', '?')} open, "
        f"{o.get('tasks_left', '?')} tasks{wakeups}"
    )


def _verdict(sc: Any, v: dict[str, Any], lay: dict[str, Any]) -> str:
    if not lay.get("clean"):
        return "FAIL"
    if sc.vanilla_hangs:
        return "fixed" if not v.get("closed") else "clean (vanilla did not hang here)"
    if getattr(sc, "vanilla_leaks", False):
        return "fixed" if v.get("tasks_left") else "clean (vanilla did not leak here)"
    return "ok"


def _check(args: argparse.Namespace) -> int:
    from . import compat
    from .testing.scenarios import SCENARIOS

    ids, e2e_ids = _scenario_ids(args.only, args.e2e)
    version = compat.installed_version()
    print(
        f"livekit-safeclose check: {len(ids) + len(e2e_ids)} scenario(s) on livekit-agents {version}, "
        f"drain_timeout={args.drain_timeout}s close_timeout={args.close_timeout}s "
        f"vanilla_limit={args.vanilla_limit}s",
        file=sys.stderr,
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    done = 0

    def run_pair(sid: str) -> dict[str, Any]:
        if "@" in sid:
            from .testing.e2e import E2E_SCENARIOS

            esc = E2E_SCENARIOS[sid.split("@")[0]]
            v = _spawn(sid, "vanilla", args, child="_run_e2e", hangs=esc.vanilla_hangs)
            lay = _spawn(sid, "layer", args, child="_run_e2e")
            verdict = (
                "FAIL"
                if not lay.get("clean")
                else ("fixed" if not v.get("closed") or v.get("provider_open") else "ok")
            )
            # a control: vanilla did not hang and left nothing open at the provider
            if not esc.vanilla_hangs and lay.get("clean") and not v.get("provider_open"):
                verdict = "ok"
            return {"scenario": "e2e:" + sid, "stuck": esc.stuck, "path": "aclose", "vanilla": v, "layer": lay,
                    "verdict": verdict}  # fmt: skip
        sc = SCENARIOS[sid]
        if (reason := sc.not_applicable()) is not None:
            na = {"closed": False, "error": reason}
            return {"scenario": sid, "stuck": sc.stuck, "path": sc.path, "vanilla": na, "layer": na,
                    "verdict": f"n/a: {reason}"}  # fmt: skip
        v = _spawn(sid, "vanilla", args)
        lay = _spawn(sid, "layer", args)
        return {
            "scenario": sid,
            "stuck": sc.stuck,
            "path": sc.path,
            "vanilla": v,
            "layer": lay,
            "verdict": _verdict(sc, v, lay),
        }

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        total = len(ids) + len(e2e_ids)
        for row in pool.map(run_pair, ids + e2e_ids):
            done += 1
            rows.append(row)
            print(
                f"[{done}/{total}] {row['scenario']}: vanilla {_cell(row['vanilla'])}; "
                f"layer {_cell(row['layer'])} -> {row['verdict']}",
                file=sys.stderr,
                flush=True,
            )

    ok = all(r["verdict"] != "FAIL" for r in rows)
    if args.json:
        print(json.dumps({"livekit_agents": version, "ok": ok, "scenarios": rows}, indent=2))
    else:
        print(_table(rows))
        fixed = sum(r["verdict"] == "fixed" for r in rows)
        print(f"\n{fixed} scenario(s) hang (or leave a provider connection open) on vanilla and "
              "close cleanly with the layer; "
              f"{sum(r['verdict'] == 'FAIL' for r in rows)} fail with the layer.")  # fmt: skip
    return 0 if ok else 1


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "close path", "vanilla", "with layer", "verdict"]
    body = [[r["scenario"], r["path"], _cell(r["vanilla"]), _cell(r["layer"]), r["verdict"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def _positive(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0: {text!r}")
    return value


def _fuzz_parser(sub: Any) -> None:
    fuzz = sub.add_parser("fuzz", help="replay generated close schedules and shrink any that fail")
    fuzz.add_argument("--schedules", type=int, default=100, help="how many schedules (default 100)")
    fuzz.add_argument("--seed", type=int, default=0, help="the same seed replays the same schedules")
    fuzz.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    fuzz.add_argument("--json", action="store_true", help="print the summary as JSON")
    fuzz.add_argument("--vanilla", action="store_true", help="run the schedules on vanilla livekit-agents "
                      "and count how many break the invariants (nothing is shrunk)")  # fmt: skip
    fuzz.add_argument("--no-shrink", action="store_true", help="report failures unshrunk")
    fuzz.add_argument("--shrink-seconds", type=_positive, default=180.0, help="time to shrink one failure")


def _fuzz(args: argparse.Namespace) -> int:
    """``fuzz``: how many schedules ran, how many failed, and each failure's minimal
    reproducer as a catalogue entry; exit 0 only when none failed and every schedule ran."""
    missing = [m for m in ("hypothesis", *_CHECK_NEEDS) if not _installed(m)]
    if missing:
        print(f"error: livekit-safeclose fuzz needs {', '.join(missing)}; run: pip install {_TESTING_EXTRA}",
              file=sys.stderr)  # fmt: skip
        return 2
    from .testing.fuzz import engine

    engine.SHRINK_SECONDS = args.shrink_seconds
    summary = engine.run(
        args.schedules, args.seed, patched=not args.vanilla, jobs=max(1, args.jobs),
        shrink=not args.no_shrink, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(engine.describe(summary))
    return 1 if summary.failed or summary.harness_errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livekit-safeclose", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="run the close scenarios on vanilla and with the layer")
    check.add_argument("--only", action="append", help="scenario ids, prefixes or globs (comma-separated)")
    check.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    check.add_argument("--drain-timeout", type=_positive, default=0.5)
    check.add_argument("--close-timeout", type=_positive, default=3.0)
    check.add_argument(
        "--vanilla-limit", type=_positive, default=1.0, help="seconds to wait before calling vanilla hung"
    )
    check.add_argument("--jobs", type=int, default=2, help="scenarios run in parallel (default 2)")
    check.add_argument("--list", action="store_true", help="list the scenarios and exit")
    check.add_argument(
        "--e2e",
        action="store_true",
        help="also run the real-socket scenarios (real plugins against local stand-in provider servers); "
        "their 'open' column is the provider server's count of open STT connections",
    )
    _fuzz_parser(sub)
    run = sub.add_parser("_run", help=argparse.SUPPRESS)
    run.add_argument("scenario")
    run.add_argument("--mode", choices=["vanilla", "layer"], required=True)
    run.add_argument("--drain-timeout", type=_positive, default=0.5)
    run.add_argument("--close-timeout", type=_positive, default=3.0)
    run.add_argument("--vanilla-limit", type=_positive, default=1.0)
    matrix = sub.add_parser(
        "matrix",
        help="run the catalogue on every livekit-agents release (one cached venv each), vanilla and "
        "with the layer, and write the table",
    )
    from .testing.matrix import add_arguments

    add_arguments(matrix)
    run_e2e = sub.add_parser("_run_e2e", help=argparse.SUPPRESS)
    for a in run._actions[1:]:
        run_e2e._add_action(a)
    _add_idle_report(sub)
    _add_upstream(sub, run)
    return parser


def _add_upstream(sub: Any, run: argparse.ArgumentParser) -> None:
    from .upstream import add_arguments

    add_arguments(sub.add_parser("upstream", help="the close-path fix as a diff against livekit-agents"))
    child = sub.add_parser("_run_upstream", help=argparse.SUPPRESS)
    for a in run._actions[1:]:
        child._add_action(a)


def _add_idle_report(sub: Any) -> None:
    from .worker.idle_report import add_arguments

    add_arguments(sub.add_parser("idle-report", help="what a running worker's processes cost (memory, CPU)"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "idle-report":
        from .worker.idle_report import run_command

        return run_command(args, parser)
    if args.command == "_run":
        from .check_child import run_one

        code = run_one(args)
        sys.stdout.flush()  # printed: what the run left is not torn down (see _run_untorn)
        os._exit(code)
    if args.command == "_run_e2e":
        from .check_child import run_e2e

        code = run_e2e(args)
        # the child's answer is printed: skip interpreter teardown, which can wait a minute
        # on native threads after a realtime run (the FFI audio resampler)
        sys.stdout.flush()
        os._exit(code)
    if args.command == "fuzz":
        return _fuzz(args)
    if args.command in ("upstream", "_run_upstream"):
        from . import upstream

        return upstream.run(args) if args.command == "upstream" else upstream.verify.run_child(args)
    if args.command == "matrix":
        from .testing.matrix import main as matrix_main

        return matrix_main(args, argv)
    if args.drain_timeout > args.close_timeout:
        print("error: --drain-timeout must be <= --close-timeout", file=sys.stderr)
        return 2
    if args.list:
        from .testing.scenarios import SCENARIOS

        for sc in SCENARIOS.values():
            print(f"{sc.id:36} {sc.path:10} {sc.stuck}")
        return 0
    missing = _missing_dependencies(args.e2e)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    return _check(args)


if __name__ == "__main__":
    raise SystemExit(main())
