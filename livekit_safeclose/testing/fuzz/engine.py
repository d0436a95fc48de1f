"""Running many schedules, confirming and shrinking the failures, printing them.

Schedules run one after another in one event loop (``jobs`` worker processes split the
indices between them). A schedule that fails is run once more: failing again, it counts as
a failure and is shrunk; passing, it is reported as unconfirmed (a timing fluke on a loaded
machine) and does not count. Shrinking hands the failing schedule's choices to
``hypothesis`` through its example database: hypothesis replays it and shrinks it toward
the simplest schedule that still breaks the same invariant.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .invariants import Verdict
from .replay import replay
from .schedule import Schedule
from .strategies import generate_one, schedules

#: how many re-runs must fail too before a failure counts (a pass among them: unconfirmed)
CONFIRMATIONS = 1
#: how long shrinking one failure may take (seconds) before the best so far is kept
SHRINK_SECONDS = 180.0


@dataclass
class Failure:
    index: int
    schedule: Schedule
    choices: list[int]
    violations: list[str]
    confirmed: bool
    minimal: Schedule | None = None
    minimal_violations: list[str] = field(default_factory=list)
    shrink_runs: int = 0

    @property
    def invariant(self) -> str:
        return self.violations[0].split(":", 1)[0] if self.violations else "?"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "confirmed": self.confirmed,
            "violations": self.violations,
            "schedule": json.loads(self.schedule.to_json()),
            "choices": self.choices,
            "minimal": json.loads(self.minimal.to_json()) if self.minimal is not None else None,
            "minimal_violations": self.minimal_violations,
            "scenario": catalogue_entry(self) if self.minimal is not None else None,
        }


@dataclass
class Summary:
    seed: int
    schedules: int
    patched: bool
    seconds: float = 0.0
    ran: int = 0
    slowest: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    #: what kept schedules from running (a worker process that died): never a silent gap
    harness_errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Failure]:
        return [f for f in self.failures if f.confirmed]

    @property
    def unconfirmed(self) -> list[Failure]:
        return [f for f in self.failures if not f.confirmed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "schedules": self.ran,
            "mode": "layer" if self.patched else "vanilla",
            "failed": len(self.failed),
            "unconfirmed": len(self.unconfirmed),
            "seconds": round(self.seconds, 1),
            "schedules_per_second": round(self.ran / self.seconds, 2) if self.seconds else 0.0,
            "slowest_schedule_s": round(self.slowest, 2),
            "failures": [f.to_dict() for f in self.failures],
            "harness_errors": self.harness_errors,
        }


def _quiet_logs() -> None:
    import logging

    logging.disable(logging.CRITICAL)  # every forced close logs a WARNING: thousands of them


def run_indices(
    seed: int, indices: Iterator[int] | range, *, patched: bool, on_result: Callable[[int, Verdict], None]
) -> None:
    """Replay schedules ``indices`` of ``seed`` in one event loop, in order; a failing one
    is replayed :data:`CONFIRMATIONS` times more (until one passes) and ``on_result`` gets
    the last re-run's verdict too (``index`` < 0)."""
    from ..scenarios import load_vad

    _quiet_logs()
    load_vad()
    loops = [asyncio.new_event_loop()]
    try:
        for i in indices:
            schedule, _ = generate_one(seed, i)
            verdict = _replay_in(loops, schedule, patched)
            on_result(i, verdict)
            if not verdict.ok and patched:
                again = verdict
                for _ in range(CONFIRMATIONS):
                    again = _replay_in(loops, schedule, patched)
                    if not set(verdict.invariants) & set(again.invariants):
                        break
                on_result(-1 - i, again)
    finally:
        loops[-1].close()


def _replay_in(loops: list[asyncio.AbstractEventLoop], schedule: Schedule, patched: bool) -> Verdict:
    """One replay in the last of ``loops``. A replay that raises is a ``harness`` violation
    (it is confirmed and shrunk like any other), and the schedules after it get a fresh loop:
    what the raising one left in its loop is abandoned with it, not closed."""
    from .invariants import Violation

    t0 = time.monotonic()
    try:
        return loops[-1].run_until_complete(replay(schedule, patched=patched))
    except Exception as exc:
        loops.append(asyncio.new_event_loop())
        detail = f"the replay raised {type(exc).__name__}: {str(exc)[:200]}"
        return Verdict(schedule, patched, time.monotonic() - t0, [Violation("harness", detail)])


def run(
    n: int, seed: int, *, patched: bool = True, jobs: int = 1, shrink: bool = True, progress: Any = None
) -> Summary:
    """Run schedules ``0..n-1`` of ``seed`` and shrink every confirmed failure."""
    summary = Summary(seed, n, patched)
    first: dict[int, Verdict] = {}
    t0 = time.monotonic()

    def on_result(i: int, v: Verdict) -> None:
        if i >= 0:
            summary.ran += 1
            summary.slowest = max(summary.slowest, v.seconds)
            if progress is not None and summary.ran % 100 == 0:
                progress(f"{summary.ran}/{n} schedules, {len(summary.failures)} failing")
            if not v.ok:
                first[i] = v
                if not patched:
                    summary.failures.append(_failure(seed, i, v, confirmed=True))
            return
        index = -1 - i
        confirmed = bool(set(first[index].invariants) & set(v.invariants))
        summary.failures.append(_failure(seed, index, first[index], confirmed=confirmed))
        if progress is not None:  # a long run shows each failure as it is found
            state = "confirmed" if confirmed else "unconfirmed"
            progress(f"#{index} failed ({state}): {'; '.join(str(x) for x in first[index].violations)}")

    if jobs > 1:
        summary.harness_errors = _run_workers(n, seed, patched=patched, jobs=jobs, on_result=on_result)
    else:
        run_indices(seed, range(n), patched=patched, on_result=on_result)
    summary.failures.sort(key=lambda f: f.index)
    summary.seconds = time.monotonic() - t0
    if shrink and patched:
        _shrink_all(summary, progress)
    return summary


def _failure(seed: int, i: int, v: Verdict, *, confirmed: bool) -> Failure:
    schedule, choices = generate_one(seed, i)
    return Failure(i, schedule, choices, [str(x) for x in v.violations], confirmed)


def _shrink_all(summary: Summary, progress: Any) -> None:
    """Shrink the first confirmed failure of each distinct set of broken invariants; the
    others point at it (``minimal`` stays None)."""
    seen: set[tuple[str, ...]] = set()
    for f in summary.failed:
        key = tuple(sorted({v.split(":", 1)[0] for v in f.violations}))
        if key in seen:
            continue
        seen.add(key)
        if progress is not None:
            progress(f"shrinking schedule #{f.index} ({', '.join(key)})")
        f.minimal, f.minimal_violations, f.shrink_runs = shrink(f.schedule, f.choices, f.invariant)


class _Failing(Exception):
    pass


def shrink(
    schedule: Schedule,
    choices: list[int],
    invariant: str,
    *,
    seconds: float = SHRINK_SECONDS,
    detail: str = "",
) -> tuple[Schedule, list[str], int]:
    """The smallest schedule hypothesis finds that still breaks ``invariant`` (with
    ``detail`` in the violation, when given), starting from ``schedule`` (given as its
    ``choices``): (schedule, its violations, replays run)."""
    from hypothesis import HealthCheck, Phase, given, settings

    from ..scenarios import load_vad

    _quiet_logs()
    load_vad()
    best: list[tuple[Schedule, list[str]]] = [(schedule, [])]
    runs = [0]
    deadline = time.monotonic() + seconds
    loop = asyncio.new_event_loop()

    @settings(
        database=_example_database(choices),
        phases=[Phase.reuse, Phase.shrink],
        max_examples=10_000,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        print_blob=False,
    )
    @given(schedules())
    def probe(candidate: Schedule) -> None:
        if time.monotonic() > deadline and candidate != best[-1][0]:
            return  # out of time: only the best so far still fails
        runs[0] += 1
        verdict = loop.run_until_complete(replay(candidate))
        if any(v.invariant == invariant and detail in v.detail for v in verdict.violations):
            best.append((candidate, [str(v) for v in verdict.violations]))
            raise _Failing(invariant)

    try:
        # a timing-sensitive failure may not show on hypothesis's first replay of it: the
        # search starts again (up to three times) while nothing smaller has failed yet
        for _ in range(3):
            try:
                probe()
            except Exception:  # _Failing, or hypothesis's flaky report around it
                pass
            if len(best) > 1 or time.monotonic() > deadline:
                break
    finally:
        loop.close()
    minimal, violations = best[-1]
    return minimal, violations, runs[0]


def _example_database(choices: list[int]) -> Any:
    """A hypothesis example database holding one failing example, offered as a not yet
    shrunk one (hypothesis's secondary corpus: a primary entry would be taken as shrunk
    already). It stores nothing."""
    from hypothesis.database import ExampleDatabase, choices_to_bytes

    blob = choices_to_bytes(choices)

    class OneExample(ExampleDatabase):
        def fetch(self, key: bytes) -> Iterator[bytes]:
            if key.endswith(b".secondary"):
                yield blob

        def save(self, key: bytes, value: bytes) -> None:
            pass

        def delete(self, key: bytes, value: bytes) -> None:
            pass

        def move(self, src: bytes, dest: bytes, value: bytes) -> None:
            pass

    return OneExample()


def _run_workers(
    n: int, seed: int, *, patched: bool, jobs: int, on_result: Callable[[int, Verdict], None]
) -> list[str]:
    """``jobs`` worker processes, worker ``w`` running indices ``w, w + jobs, ...``; each
    prints one JSON line per replay. Returns what went wrong with the workers: one that
    exited early or with an error names the first schedule it did not report."""
    cmd = [sys.executable, "-m", "livekit_safeclose.testing.fuzz.engine", str(n), str(seed), str(jobs)]
    procs = [
        subprocess.Popen([*cmd, str(w), "layer" if patched else "vanilla"], stdout=subprocess.PIPE, text=True,
                         env=os.environ.copy())
        for w in range(jobs)
    ]  # fmt: skip
    import selectors

    sel = selectors.DefaultSelector()
    for p in procs:
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ)
    worker_of = {p.stdout: w for w, p in enumerate(procs)}
    reported = [0] * jobs
    live = len(procs)
    while live:
        for key, _ in sel.select():
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                live -= 1
                continue
            data = json.loads(line)
            if data["i"] >= 0:
                reported[worker_of[key.fileobj]] += 1  # type: ignore[index]
            on_result(data["i"], _verdict(data))
    errors = []
    for w, p in enumerate(procs):
        rc = p.wait()
        expected = len(range(w, n, jobs))
        if reported[w] < expected:
            errors.append(
                f"worker {w} exited with code {rc} after {reported[w]} of its {expected} schedules: "
                f"{expected - reported[w]} did not run (#{w + reported[w] * jobs}, then every {jobs} on)"
            )
        elif rc != 0:
            errors.append(f"worker {w} exited with code {rc} after all its {expected} schedules")
    return errors


def _verdict(data: dict[str, Any]) -> Verdict:
    from .invariants import Violation

    schedule, _ = generate_one(data["seed"], data["index"])
    violations = [Violation(*v.split(": ", 1)) for v in data["violations"]]
    return Verdict(schedule, data["patched"], data["seconds"], violations)


def _worker_main(argv: list[str]) -> int:
    n, seed, jobs, w = (int(x) for x in argv[:4])
    patched = argv[4] == "layer"

    def emit(i: int, v: Verdict) -> None:
        index = i if i >= 0 else -1 - i
        out = {"i": i, "index": index, "seed": seed, "patched": patched, "seconds": v.seconds,
               "violations": [str(x) for x in v.violations]}  # fmt: skip
        print(json.dumps(out), flush=True)

    run_indices(seed, range(w, n, jobs), patched=patched, on_result=emit)
    return 0


def catalogue_entry(f: Failure) -> str:
    """The failure's minimal schedule as a ready-to-paste ``FuzzFound`` catalogue entry."""
    schedule = f.minimal or f.schedule
    broken = (f.minimal_violations or f.violations)[0].replace('"', "'")
    slug = broken.split(":", 1)[0]
    return (
        f'    FuzzFound(\n        "fuzz-{slug}-{f.index}",\n        "{broken[:90]}",\n'
        f"        {schedule.source(indent='        ', setup_name='FuzzSetup')},\n    ),\n"
    )


def describe(summary: Summary) -> str:
    """The human report: the counts, then each failure with its minimal reproducer."""
    d = summary.to_dict()
    out = [
        f"{d['schedules']} schedules (seed {summary.seed}, {d['mode']}) in {d['seconds']} s: "
        f"{d['schedules_per_second']} schedules/s, slowest {d['slowest_schedule_s']} s",
        f"{len(summary.failed)} failed, {len(summary.unconfirmed)} unconfirmed (failed once, passed on a re-run)",
        *(f"HARNESS ERROR: {e}" for e in summary.harness_errors),
    ]
    for f in summary.failures:
        state = "FAILED" if f.confirmed else "unconfirmed"
        out.append(f"\n#{f.index} {state}: {f.schedule.describe()}")
        out.extend(f"    {v}" for v in f.violations)
        if f.minimal is not None:
            out.append(f"  minimal reproducer ({f.shrink_runs} replays to shrink): {f.minimal.describe()}")
            out.extend(f"    {v}" for v in f.minimal_violations)
            out.append("  catalogue entry:\n" + catalogue_entry(f))
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
