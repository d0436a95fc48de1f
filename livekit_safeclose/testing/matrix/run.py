"""The version matrix: every release's venv built (or reused), its catalogue run, one table.

Releases run side by side: up to ``jobs`` catalogue shards at once (the runs mostly wait on
bounds, so several fit on two cores), venvs built up to three at a time. Each shard is one process in
its release's venv under a hard kill bound, so a hang, even of the runner itself, ends as a
recorded error and never hangs the matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .venvs import Venv, ensure

#: per scenario, beyond its own bounds: session start, the fakes, the unwinds
_PER_SCENARIO_S = 12.0
_SHARD_OVERHEAD_S = 120.0


def _kill_bound(n_scenarios: int) -> float:
    return _SHARD_OVERHEAD_S + n_scenarios * _PER_SCENARIO_S


def _env() -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_shard(venv: Venv, scenarios: str, shard: int, shards: int, n_scenarios: int) -> dict[str, Any]:
    """One shard of one release's catalogue, in that release's venv."""
    cmd = [venv.python, "-m", "livekit_safeclose.testing.matrix.child", "--scenarios", scenarios,
           "--shard", str(shard), "--shards", str(shards)]  # fmt: skip
    bound = _kill_bound(n_scenarios)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=bound, env=_env(), cwd=Path(venv.path)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"shard {shard} killed after {bound:.0f} s", "scenarios": []}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"error": f"shard {shard} exited {proc.returncode}: {tail}", "scenarios": []}
    out: dict[str, Any] = json.loads(lines[-1])
    out["shard_wall_s"] = round(time.monotonic() - t0, 1)
    return out


class Matrix:
    """One matrix run: the plan, the pools, the results as they come in."""

    def __init__(
        self,
        releases: list[str],
        *,
        scenarios: str,
        jobs: int,
        shards: int,
        cache: Path,
        rebuild: bool = False,
        quiet: bool = False,
    ) -> None:
        self.releases, self.scenarios, self.cache = releases, scenarios, cache
        self.jobs, self.shards, self.rebuild, self.quiet = max(1, jobs), max(1, shards), rebuild, quiet
        self.results: dict[str, dict[str, Any]] = {r: {"release": r} for r in releases}
        self._lock = threading.Lock()
        self._n_scenarios = len(_selection(scenarios))

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def _build(self, release: str, runner: ThreadPoolExecutor) -> list[Future[None]]:
        venv = ensure(release, self.cache, rebuild=self.rebuild)
        self.results[release]["venv"] = asdict(venv)
        how = "reused" if venv.reused else f"built with {venv.backend}"
        if not venv.ok:
            self._say(f"[{release}] venv failed ({venv.build_s} s): {venv.error}")
            return []
        extra = f", +{', '.join(venv.undeclared)} (undeclared)" if venv.undeclared else ""
        self._say(f"[{release}] venv {how} in {venv.build_s} s{extra}")
        per_shard = -(-self._n_scenarios // self.shards)
        return [
            runner.submit(self._run, venv, shard, per_shard)
            for shard in range(min(self.shards, self._n_scenarios) or 1)
        ]

    def _run(self, venv: Venv, shard: int, per_shard: int) -> None:
        shards = min(self.shards, self._n_scenarios) or 1
        out = run_shard(venv, self.scenarios, shard, shards, per_shard)
        with self._lock:
            rec = self.results[venv.release]
            rec.setdefault("scenarios", []).extend(out.pop("scenarios", []))
            if "error" in out:
                rec.setdefault("errors", []).append(out["error"])
            for key in ("install", "bounds", "python"):
                if key in out:
                    rec[key] = out[key]
            rec["shard_wall_s"] = max(rec.get("shard_wall_s", 0.0), out.get("shard_wall_s", 0.0))
            done = len(rec["scenarios"])
        self._say(f"[{venv.release}] shard {shard}: {done}/{self._n_scenarios} scenarios")

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        with ThreadPoolExecutor(self.jobs) as runner, ThreadPoolExecutor(min(3, self.jobs)) as builder:
            builds = [builder.submit(self._build, r, runner) for r in self.releases]
            shards: list[Future[None]] = []
            for build in builds:
                shards += build.result()
            wait(shards)
            for shard in shards:
                shard.result()
        order = {sid: i for i, sid in enumerate(_selection(self.scenarios))}
        for rec in self.results.values():
            rec.get("scenarios", []).sort(key=lambda row: order.get(row["id"], 0))
        return {
            "scenarios": self.scenarios,
            "jobs": self.jobs,
            "shards": self.shards,
            "wall_s": round(time.monotonic() - t0, 1),
            "releases": self.results,
        }


def _selection(scenarios: str) -> list[str]:
    from .verdicts import select

    return select(scenarios)
