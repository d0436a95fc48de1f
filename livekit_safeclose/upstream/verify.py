"""``upstream verify``: the generated diff applied to a copy of the installed livekit-agents,
and the scenario catalogue run against that copy without the layer.

Each scenario runs twice, each in its own child process (as ``check`` does): on vanilla,
and on the patched copy (``PYTHONPATH`` puts the copy's ``livekit/agents`` first; ``livekit``
is a namespace package, so ``livekit.rtc`` and the plugins still come from site-packages;
the child checks which ``livekit.agents`` it imported).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .apply import apply
from .generate import REPO_PREFIX, Patched, agents_root, generate

#: scenarios that exercise a layer feature outside the session's close path, with why
#: the diff leaves them to the layer (listed in the table, never silently skipped)
LAYER_ONLY: dict[str, str] = {
    "background-audio-aclose": "BackgroundAudioPlayer is not tied to the session upstream (a feature, "
    "not a close-path fix)",
}


def patched_copy(patched: Patched, where: Path) -> Path:
    """Copy the installed ``livekit/agents`` under ``where`` and apply the diff to it; the
    directory to put first on ``PYTHONPATH``."""
    dest = where / "livekit" / "agents"
    shutil.copytree(agents_root(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    apply(patched.diff(), dest, strip=REPO_PREFIX)
    return where


def _not_run(sc: Any) -> dict[str, Any]:
    """The vanilla cell of ``--no-vanilla``: what the catalogue says vanilla does."""
    return {"closed": False, "error": f"not run (catalogue: {'hangs' if sc.vanilla_hangs else 'closes'})"}


def run_child(args: argparse.Namespace) -> int:
    """The child side: one scenario on the patched copy, the layer not installed."""
    import logging

    logging.disable(logging.CRITICAL)
    import livekit.agents
    from livekit.agents.voice import _bounded_close as helper  # type: ignore[attr-defined]

    from ..testing.scenarios import SCENARIOS, run_scenario
    from ..testing.scenarios.runner import GRACEFUL_TIMEOUT

    root = os.environ.get("LIVEKIT_SAFECLOSE_UPSTREAM_COPY", "")
    if not root or not str(livekit.agents.__file__).startswith(root):
        print(
            f"livekit.agents resolved to {livekit.agents.__file__}, not the copy in {root}", file=sys.stderr
        )
        return 3
    sc = SCENARIOS[args.scenario]
    bounds = (args.drain_timeout, args.close_timeout, GRACEFUL_TIMEOUT)
    if sc.schedule is not None:
        s = sc.schedule.setup
        bounds = (min(s.drain_timeout, s.close_timeout), s.close_timeout, s.graceful_timeout)
        from ..testing.fuzz import invariants, replay

        # a replay waits for its closes as long as the bounds allow (not vanilla's 1 s)
        replay.VANILLA_LIMIT = s.close_timeout + s.graceful_timeout + invariants.MARGIN + 0.5
        _count_quarantined_as_reported(replay)
    helper.DRAIN_TIMEOUT, helper.CLOSE_TIMEOUT, helper.GRACEFUL_TIMEOUT = bounds
    limit = bounds[1] + (bounds[2] if sc.path == "graceful" else 0.0) + 1.0

    async def main() -> dict[str, Any]:
        out = await run_scenario(sc, patched=False, limit=limit)
        d = asdict(out)
        d["report"] = None
        d["clean"] = out.clean
        return d

    print(json.dumps(asyncio.run(main())), flush=True)
    return 0


def _count_quarantined_as_reported(replay_mod: Any) -> None:
    """A fuzz replay spares the zombies the layer's close report names; the patched copy
    has no report, so the tasks its close quarantined are spared instead (the same tasks:
    the ones that swallowed their cancellation)."""
    observe = replay_mod.observe

    def observe_patched(replay: Any, **kwargs: Any) -> Any:
        obs = observe(replay, **kwargs)
        close = replay.world.session.__dict__.get("_bounded_close_state")
        zombies = set(close.zombies) if close is not None else set()
        names = {t.get_name() for t in zombies}
        obs.leftover = [t for t in obs.leftover if t not in zombies]
        obs.audit.zombies = [z for z in obs.audit.zombies if z.name not in names]
        obs.audit.tasks = [z for z in obs.audit.tasks if z.name not in names]
        return obs

    replay_mod.observe = observe_patched


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="upstream_command", required=True)
    diff = sub.add_parser("diff", help="print the diff that carries the close-path fix into livekit-agents")
    diff.add_argument("--output", type=Path, help="write the diff here instead of stdout")
    diff.add_argument("--stat", action="store_true", help="print files and lines added/removed only")
    diff.add_argument("--with-tests", action="store_true", help="add the upstream-style regression tests")
    diff.add_argument("--describe", action="store_true", help="print a PR description instead")
    diff.add_argument("--from-json", type=Path, help="--describe: the table of this `verify --json` run")
    verify = sub.add_parser("verify", help="apply the diff to a copy and run the catalogue on it")
    verify.add_argument("--only", action="append", help="scenario ids, prefixes or globs (comma-separated)")
    verify.add_argument("--json", action="store_true", help="print the results as JSON")
    verify.add_argument("--jobs", type=int, default=2, help="scenarios run in parallel (default 2)")
    verify.add_argument("--no-tests", action="store_true", help="skip the upstream-style tests")
    verify.add_argument("--no-vanilla", action="store_true", help="run only the patched copy (half the time): "
                        "the vanilla column is the catalogue's claim, which the test suite proves")  # fmt: skip
    for name, default in (("--drain-timeout", 0.5), ("--close-timeout", 3.0), ("--vanilla-limit", 1.0)):
        verify.add_argument(name, type=float, default=default)


def _stat_line(patched: Patched) -> str:
    rows = patched.stat()
    return f"{len(rows)} files, +{sum(r[1] for r in rows)} -{sum(r[2] for r in rows)} lines: " + ", ".join(
        f"{p.removeprefix(REPO_PREFIX)} +{a} -{r}" for p, a, r in rows
    )


def verify(args: argparse.Namespace) -> int:
    from .. import compat
    from ..cli import _cell, _missing_dependencies, _scenario_ids, _spawn, _table, _verdict
    from ..testing.scenarios import SCENARIOS

    missing = _missing_dependencies(False)
    if missing is not None:
        print(
            missing.replace("livekit-safeclose check", "livekit-safeclose upstream verify"), file=sys.stderr
        )
        return 2
    patched = generate(with_tests=True)
    ids, _ = _scenario_ids(args.only)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lk-upstream-") as tmp:
        root = patched_copy(patched, Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               "LIVEKIT_SAFECLOSE_UPSTREAM_COPY": str(root)}  # fmt: skip
        print(f"upstream verify: {len(ids)} scenario(s) on livekit-agents {compat.installed_version()} "
              f"patched in {root}; diff: {_stat_line(patched)}", file=sys.stderr, flush=True)  # fmt: skip

        def run_pair(sid: str) -> dict[str, Any]:
            sc = SCENARIOS[sid]
            reason = sc.not_applicable() or LAYER_ONLY.get(sid)
            if reason is not None:
                na = {"closed": False, "error": reason}
                return {
                    "scenario": sid,
                    "path": sc.path,
                    "vanilla": na,
                    "layer": na,
                    "verdict": f"n/a: {reason}",
                }
            v = _spawn(sid, "vanilla", args) if not args.no_vanilla else _not_run(sc)
            p = _spawn(sid, "layer", args, child="_run_upstream", env=env)
            return {"scenario": sid, "path": sc.path, "vanilla": v, "layer": p, "verdict": _verdict(sc, v, p)}

        rows = []
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for n, row in enumerate(pool.map(run_pair, ids), 1):
                rows.append(row)
                print(f"[{n}/{len(ids)}] {row['scenario']}: vanilla {_cell(row['vanilla'])}; patched "
                      f"{_cell(row['layer'])} -> {row['verdict']}", file=sys.stderr, flush=True)  # fmt: skip
        tests = None if args.no_tests or args.only else _run_tests(patched, root)
    ok = all(r["verdict"] != "FAIL" for r in rows) and (tests is None or tests["ok"])
    wall = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps({"livekit_agents": compat.installed_version(), "ok": ok, "wall_s": wall,
                          "diff": patched.stat(), "tests": tests, "scenarios": rows}, indent=2))  # fmt: skip
    else:
        print(_table(rows).replace("| with layer", "| patched   "))
        print(f"\ndiff: {_stat_line(patched)}")
        if tests is not None:
            print(f"upstream-style tests on the patched copy: {tests['summary']}")
        fixed = sum(r["verdict"] == "fixed" for r in rows)
        print(f"{fixed} scenario(s) hang on vanilla and close cleanly on the patched copy; "
              f"{sum(r['verdict'] == 'FAIL' for r in rows)} fail; {wall} s")  # fmt: skip
    return 0 if ok else 1


def _run_tests(patched: Patched, root: Path) -> dict[str, Any]:
    """The upstream-style tests of the diff, run by pytest against the patched copy."""
    import subprocess

    from ..cli import _installed
    from .generate import TESTS

    missing = [m for m in ("pytest", "pytest_asyncio") if not _installed(m)]
    if missing:
        return {"ok": False, "summary": f"not run: {', '.join(missing)} missing (or pass --no-tests)"}
    test_dir = root / "tests"
    test_dir.mkdir(exist_ok=True)
    test_files = [test_dir / Path(rel).name for rel in TESTS]
    for rel, test_file in zip(TESTS, test_files, strict=True):
        test_file.write_text(patched.files[rel][1])
    env = {**os.environ, "PYTHONPATH": str(root), "LIVEKIT_SAFECLOSE_UPSTREAM_COPY": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:safeclose",
           *map(str, test_files), "--rootdir", str(test_dir)]  # fmt: skip
    if _installed("pytest_timeout"):
        cmd += ["--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=test_dir)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return {"ok": proc.returncode == 0, "summary": summary, "output": proc.stdout[-4000:]}
