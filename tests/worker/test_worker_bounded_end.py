"""Real 1.8.9 workers whose job runs a real AgentSession (inference STT over a real socket to the
stand-in): what happens to the provider connection when a drain ends by force.

Each stuck scenario runs twice side by side: vanilla (the assertions state what upstream does)
and with ``livekit_safeclose.install(drain_timeout=1, close_timeout=4)`` in the agent file
(``force_close_on_second_signal=True`` for the second-signal pair). Times are seconds after the
first SIGTERM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from session_scenarios import LAYER_CLOSE, SCENARIOS, SessionOutcome, run, run_pair

from livekit_safeclose.worker import FORCED_REASON_PREFIX

MARGIN = 3.0  # what the bounds below allow on top of drain_timeout + close_timeout

_runs: dict[str, tuple[SessionOutcome, ...]] = {}


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bounded-end-logs")


@pytest.fixture
def outcome(log_dir: Path) -> Callable[[str, bool], SessionOutcome]:
    """Runs a scenario once (stuck ones as a vanilla/layer pair); twin tests share the run."""

    def _get(name: str, patched: bool) -> SessionOutcome:
        if name not in _runs:
            sc = SCENARIOS[name]
            _runs[name] = (
                run_pair(sc, log_dir)
                if sc.mode == "stuck_tool" and sc.pair
                else (run(sc, patched=True, log_dir=log_dir),)
            )
            for o in _runs[name]:
                print(o.summary())
        for o in _runs[name]:
            if o.patched == patched:
                return o
        raise LookupError(name)

    return _get


def _ctx(o: SessionOutcome) -> str:
    return f"{o.summary()} (log: {o.log_path})"


def _job_warnings(o: SessionOutcome) -> list[str]:
    return [m for pid, m in o.warnings if pid == o.job_pid]


def _assert_forced_close_with_goodbye(o: SessionOutcome, *, forced_at: float, why: str) -> None:
    """The job's session was force-closed by the layer (STT goodbye seen by the provider) before
    its process ended, the close report was logged by the job, and the worker exited in time."""
    ctx = _ctx(o)
    assert o.stt_open_at_signal == 1, ctx
    assert o.shutdown_reason == f"{FORCED_REASON_PREFIX} ({why})", ctx
    assert o.stt_clean == 1 and o.stt_open_at_end == 0, ctx  # `session.close` before the socket went
    assert o.stt_closed_after is not None and o.job_exit_after is not None, ctx
    assert o.stt_closed_after <= o.job_exit_after + 0.05, ctx  # closed by the session, not the exit
    assert o.session_closed_after is not None, ctx
    assert forced_at <= o.session_closed_after <= forced_at + LAYER_CLOSE + 0.5, ctx
    warnings = _job_warnings(o)
    assert any(m.startswith("worker forced this job's shutdown") for m in warnings), ctx
    assert any(m.startswith("session close was forced") and "lookup" in m for m in warnings), ctx
    assert o.exit_code == 0 and o.exit_after is not None, ctx
    assert o.exit_after <= forced_at + LAYER_CLOSE + MARGIN, ctx
    assert o.group_left == [], ctx
    assert o.leftovers and o.leftovers[-1]["tasks"] == [] and o.leftovers[-1]["streams"] == {}, ctx


# -- (i) the drain times out while a tool is stuck ---------------------------------------------------


@pytest.mark.vanilla
@pytest.mark.timeout(90)
def test_vanilla_drain_timeout_keeps_stt_open(outcome: Callable[[str, bool], SessionOutcome]) -> None:
    o = outcome("drain_timeout_stuck_tool", False)
    ctx = _ctx(o)
    # the ShutdownRequest went out at 2 s; the job's session.aclose() waits on the stuck tool
    # under upstream's 60 s guard: 8 s after SIGTERM the provider still holds the connection,
    # nobody said goodbye, and the worker is still waiting (it exits at ~63 s; SIGKILLed here)
    assert o.stt_open_at_signal == 1 and o.stt_open_at_end == 1 and o.stt_clean == 0, ctx
    assert o.stt_closed_after is None and o.job_exit_after is None, ctx
    assert o.exit_code is None, ctx
    assert o.session_closed_after is None, ctx


@pytest.mark.timeout(90)
def test_layer_drain_timeout_force_closes_session(outcome: Callable[[str, bool], SessionOutcome]) -> None:
    o = outcome("drain_timeout_stuck_tool", True)
    drain = float(o.scenario.drain_timeout)
    _assert_forced_close_with_goodbye(o, forced_at=drain, why="drain timed out")
    assert any(m.startswith("drain timed out with 1 job(s) still running") for _, m in o.warnings), _ctx(o)


# -- (ii) a second SIGTERM during the drain -------------------------------------------------------------


@pytest.mark.vanilla
@pytest.mark.timeout(90)
def test_vanilla_second_signal_drops_stt_without_goodbye(
    outcome: Callable[[str, bool], SessionOutcome],
) -> None:
    o = outcome("second_signal_stuck_tool", False)
    ctx = _ctx(o)
    second = o.scenario.second_signal_after or 0.0
    # os._exit(1) at once; the job process dies with its parent and the socket with it
    assert o.exit_code == 1 and o.exit_after is not None and o.exit_after < second + 1.0, ctx
    assert o.stt_clean == 0 and o.session_closed_after is None, ctx
    assert o.shutdown_reason is None, ctx  # no shutdown callback ever ran


@pytest.mark.timeout(90)
def test_layer_second_signal_force_closes_session(outcome: Callable[[str, bool], SessionOutcome]) -> None:
    o = outcome("second_signal_stuck_tool", True)
    second = o.scenario.second_signal_after or 0.0
    _assert_forced_close_with_goodbye(o, forced_at=second, why="second SIGTERM")
    assert any(m.startswith("second SIGTERM during shutdown") for _, m in o.warnings), _ctx(o)


@pytest.mark.timeout(90)
def test_layer_second_signal_exits_at_once_by_default(outcome: Callable[[str, bool], SessionOutcome]) -> None:
    """Upstream's contract is kept unless force_close_on_second_signal=True: exit at once."""
    o = outcome("second_signal_default", True)
    ctx = _ctx(o)
    second = o.scenario.second_signal_after or 0.0
    assert o.exit_code == 1 and o.exit_after is not None and o.exit_after < second + 1.0, ctx
    assert o.shutdown_reason is None, ctx  # nothing was force-closed
    assert not any(m.startswith("second SIGTERM during shutdown") for _, m in o.warnings), ctx


# -- (iii) a healthy job longer than close_timeout, shorter than --drain-timeout ------------------------


@pytest.mark.timeout(90)
def test_layer_graceful_drain_not_cut(outcome: Callable[[str, bool], SessionOutcome]) -> None:
    o = outcome("healthy_long_job", True)
    ctx = _ctx(o)
    assert o.job_end_after is not None and o.job_end_after > LAYER_CLOSE, ctx  # ran its full length
    assert o.shutdown_reason == "job done" and o.statuses[-1:] == ["JS_SUCCESS"], ctx
    assert o.stt_clean == 1 and o.stt_open_at_end == 0, ctx
    assert o.warnings == [], ctx  # nothing forced, nothing killed
    assert o.exit_code == 0 and o.exit_after is not None, ctx
    assert o.job_end_after <= o.exit_after < o.job_end_after + MARGIN, ctx
    assert o.group_left == [], ctx
    assert o.leftovers and o.leftovers[-1]["reason"] == "job done", ctx


@pytest.mark.timeout(90)
def test_idle_report_in_and_outside_the_worker(outcome: Callable[[str, bool], SessionOutcome]) -> None:
    o = outcome("healthy_long_job", True)
    ctx = _ctx(o)
    inside = o.idle_in_worker
    assert inside is not None and inside["classified"] and inside["num_idle_processes"] == 2, ctx
    roles = [p["role"] for p in inside["processes"]]
    assert roles[0] == "main" and "forkserver" in roles, (ctx, roles)
    jobs = [p for p in inside["processes"] if p["role"] == "job"]
    assert [p["job_id"] for p in jobs] == [o.job_id] and jobs[0]["pid"] == o.job_pid, (ctx, roles)
    idle = [p for p in inside["processes"] if p["role"] in ("idle", "starting")]
    assert idle and all(p["rss_mb"] > 10 for p in idle), (ctx, idle)
    assert inside["idle"]["count"] == roles.count("idle"), ctx

    outside = o.idle_outside
    assert outside is not None and not outside.classified, ctx
    procs = outside.by_role("job-or-idle")
    assert o.job_pid in [p.pid for p in procs] and len(procs) >= 2, (ctx, outside.summary())
    assert all(p.pss_mb is not None and p.uss_mb is not None for p in procs), outside.summary()
