"""The schedule fuzzer: deterministic per seed, its invariants bite on vanilla, its shrinker
reaches a minimal schedule, and a fixed seed finds no failure with the layer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from livekit_safeclose.testing.fuzz import engine
from livekit_safeclose.testing.fuzz.invariants import Verdict, Violation
from livekit_safeclose.testing.fuzz.replay import replay
from livekit_safeclose.testing.fuzz.schedule import Schedule, Setup, Step
from livekit_safeclose.testing.fuzz.strategies import generate, generate_one

#: the CI run: a fixed seed, schedules enough to take ~2-3 minutes on 2 cores
CI_SEED = 20240601
CI_SCHEDULES = int(os.environ.get("SAFECLOSE_FUZZ_SCHEDULES", "200"))

STUCK_TOOL = Schedule(
    Setup(), (Step("started"), Step("user", "tool:stuck"), Step("wait", 50), Step("close", "aclose"))
)


def test_same_seed_same_schedules() -> None:
    assert generate(200, 7) == generate(200, 7)
    assert generate(50, 7) != generate(50, 8)
    # schedule i of a seed does not depend on how many are run (or by which worker)
    assert generate_one(7, 123)[0] == generate(124, 7)[123]


def test_schedule_round_trips_through_json_and_source() -> None:
    s = generate_one(3, 5)[0]
    assert Schedule.from_json(s.to_json()) == s
    assert eval(s.source(), {"Schedule": Schedule, "Setup": Setup, "Step": Step}) == s


def test_shrinker_reaches_the_minimal_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypothesis shrinks a failing schedule (handed to it as its choices) to the smallest
    one that still breaks the invariant; the replay is stubbed: a schedule fails when it
    holds a graceful close and a stuck tool."""

    async def fake_replay(schedule: Schedule, patched: bool = True) -> Verdict:
        kinds = {(s.kind, s.arg) for s in schedule.steps}
        bad = ("close", "graceful") in kinds and ("user", "tool:stuck") in kinds
        return Verdict(schedule, patched, 0.0, [Violation("bound", "stub")] if bad else [])

    monkeypatch.setattr(engine, "replay", fake_replay)
    i = next(
        i for i in range(500) if _stub_fails(generate_one(11, i)[0]) and len(generate_one(11, i)[0].steps) > 4
    )
    schedule, choices = generate_one(11, i)
    minimal, violations, runs = engine.shrink(schedule, choices, "bound", seconds=60)
    assert violations == ["bound: stub"]
    assert minimal.setup == Setup()
    assert sorted((s.kind, s.arg) for s in minimal.steps) == [("close", "graceful"), ("user", "tool:stuck")]
    assert runs > 1


def _stub_fails(s: Schedule) -> bool:
    kinds = {(st.kind, st.arg) for st in s.steps}
    return ("close", "graceful") in kinds and ("user", "tool:stuck") in kinds


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_invariants_bite_on_vanilla_and_hold_with_the_layer() -> None:
    vanilla = await replay(STUCK_TOOL, patched=False)
    assert {"bound", "close-events", "provider-open", "tasks-left"} <= set(vanilla.invariants), vanilla
    layer = await replay(STUCK_TOOL, patched=True)
    assert layer.ok, layer.violations


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_error_step_is_a_close_request_once_the_session_hears_it() -> None:
    """Upstream subscribes to a model's errors only when the activity starts its session: an
    error emitted while ``start()`` has not got there reaches no session (on vanilla
    either), so it is no close request; one emitted after ``start()`` closes the session."""
    early = Schedule(Setup(), (Step("error", "stt"),))
    heard = Schedule(Setup(), (Step("started"), Step("error", "stt")))
    for patched in (False, True):
        for schedule in (early, heard):
            verdict = await replay(schedule, patched=patched)
            assert "session-open" not in verdict.invariants, (patched, schedule.describe())


def test_catalogue_entry_is_ready_to_paste() -> None:
    schedule, choices = generate_one(1, 2)
    f = engine.Failure(2, schedule, choices, ["tasks-left: 1 task"], True, STUCK_TOOL, ["tasks-left: 1 task"])
    entry = engine.catalogue_entry(f)
    from livekit_safeclose.testing.scenarios import fuzz_found as catalogue

    ns: dict[str, Any] = vars(catalogue)
    built = eval(entry.strip().rstrip(","), ns)
    assert built.schedule == STUCK_TOOL and built.id == "fuzz-tasks-left-2"


#: findings of the fuzzer not fixed yet (see the fuzz notes): a failure made only of these
#: does not fail the CI run, anything else does. Each is a substring of a violation.
KNOWN_OPEN: tuple[str, ...] = ()


def _open_only(violations: list[str]) -> bool:
    return all(any(k in v for k in KNOWN_OPEN) for v in violations)


@pytest.mark.fuzz
@pytest.mark.timeout(400)
def test_fixed_seed_finds_no_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI's run: a few hundred schedules of a fixed seed, each replayed on a real session;
    every failure is listed with its schedule (unshrunk, to stay inside the budget). On a
    loaded CI machine a failure counts only when two re-runs fail too."""
    monkeypatch.setattr(engine, "CONFIRMATIONS", 2)
    t0 = time.monotonic()
    summary = engine.run(CI_SCHEDULES, CI_SEED, jobs=1, shrink=False)
    wall = time.monotonic() - t0
    print(f"fuzz: {summary.ran} schedules in {wall:.0f} s ({summary.ran / wall:.2f}/s)")
    assert summary.ran == CI_SCHEDULES
    new = [f for f in summary.failed if not _open_only(f.violations)]
    assert not new, engine.describe(summary)


@pytest.mark.timeout(120)
def test_fuzz_command_json() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "livekit_safeclose.cli",
            "fuzz",
            "--schedules",
            "3",
            "--seed",
            str(CI_SEED),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    data = json.loads(proc.stdout)
    assert data["schedules"] == 3 and data["mode"] == "layer"
    assert proc.returncode == (1 if data["failed"] else 0), proc.stderr[-2000:]
    assert {"failed", "unconfirmed", "seconds", "schedules_per_second", "failures"} <= set(data)


def test_fuzz_loop_is_isolated() -> None:
    """Each schedule leaves nothing in the loop for the next one: two runs of the same
    schedules in one loop give the same verdicts."""
    loop = asyncio.new_event_loop()
    try:
        first = [loop.run_until_complete(replay(STUCK_TOOL)).ok for _ in range(2)]
    finally:
        loop.close()
    assert first == [True, True]


@pytest.mark.asyncio
@pytest.mark.timeout(10)
async def test_cleanup_survives_an_await_cycle() -> None:
    """A task awaiting a gather of itself (what upstream's tool drain did from inside the
    tool, fuzz seed 11 #1260): ``Task.cancel()`` recurses around it until RecursionError,
    which killed the fuzz worker. The cleanup returns the task instead of raising."""
    from livekit_safeclose.testing._runs import cancel_since

    before = set(asyncio.all_tasks())
    holder: list[asyncio.Future[Any]] = []

    async def awaits_itself() -> None:
        me = asyncio.current_task()
        assert me is not None
        holder.append(asyncio.gather(me))
        await holder[0]

    task = asyncio.create_task(awaits_itself())
    await asyncio.sleep(0)
    assert await cancel_since(before, timeout=0.05) == [task]
    holder[0].set_result([None])  # the test ends the cycle itself
    await asyncio.wait({task}, timeout=1)
    assert task.done()


def test_a_replay_that_raises_is_a_harness_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replay that raises is reported (and re-run) as a ``harness`` violation, and the
    schedules after it still run, in a fresh loop."""
    real = engine.replay
    calls: list[int] = []

    async def flaky(schedule: Schedule, *, patched: bool = True) -> Verdict:
        calls.append(len(calls))
        if len(calls) <= 2:  # the schedule and its confirmation
            raise RecursionError("maximum recursion depth exceeded")
        return await real(schedule, patched=patched)

    monkeypatch.setattr(engine, "replay", flaky)
    got: list[tuple[int, list[str]]] = []
    engine.run_indices(CI_SEED, range(2), patched=True, on_result=lambda i, v: got.append((i, v.invariants)))
    assert got[0] == (0, ["harness"]) and got[1] == (-1, ["harness"])
    assert got[2][0] == 1 and "harness" not in got[2][1]


def test_a_worker_that_dies_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process that exits before reporting its share names the first schedule it
    did not run; ``fuzz`` then exits non-zero instead of printing a shorter clean run."""
    line = json.dumps({"i": 0, "index": 0, "seed": 1, "patched": True, "seconds": 0.1, "violations": []})
    real_popen = subprocess.Popen

    def dying_worker(cmd: list[str], **kw: Any) -> Any:
        w = int(cmd[6])
        script = f"print({line!r}.replace('\"i\": 0', '\"i\": {w}')); raise SystemExit(3)"
        return real_popen([sys.executable, "-c", script], **kw)

    monkeypatch.setattr(engine.subprocess, "Popen", dying_worker)
    results: list[int] = []
    errors = engine._run_workers(6, 1, patched=True, jobs=2, on_result=lambda i, v: results.append(i))
    assert sorted(results) == [0, 1]
    assert errors == [
        "worker 0 exited with code 3 after 1 of its 3 schedules: 2 did not run (#2, then every 2 on)",
        "worker 1 exited with code 3 after 1 of its 3 schedules: 2 did not run (#3, then every 2 on)",
    ]
