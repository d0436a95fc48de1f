"""One shutdown scenario, driven the same way against a vanilla and a patched worker.

Timeline: the worker registers; job J1 is offered and runs for ``job_seconds``; SIGTERM goes to
the worker's main process (while J1's ``request_fnc`` blocks the loop, if ``request_block``;
while a second request's ``request_fnc`` awaits, if ``late_accept``); job J2 is offered
``j2_delay`` after the signal; then we watch for a FULL status and the exit, bounded by
``exit_bound`` seconds after the signal ("never" means: not within that bound).
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from worker_harness import API_KEY, API_SECRET, WorkerProcess

from livekit_safeclose.testing.dispatch import DispatchServer, JobOfferResult

PATCHES = "signal_guard,drain_availability"


@dataclass(frozen=True)
class Scenario:
    name: str
    handler: str = "none"  # SC_HANDLER of tests/worker/agents/scenario_agent.py
    request_block: float = 0.0  # seconds J1's request_fnc blocks the loop (time.sleep)
    late_accept: float = 0.0  # seconds an in-flight request's request_fnc awaits
    job_seconds: float = 1.5
    j2_delay: float = 0.3  # seconds between SIGTERM and offering J2
    exit_bound: float = 4.0  # seconds after SIGTERM we wait for the exit


@dataclass
class Outcome:
    scenario: Scenario
    patched: bool
    log_path: Path
    registered_after: float = 0.0  # seconds from process start
    j1: JobOfferResult | None = None
    inflight: JobOfferResult | None = None  # offered before SIGTERM, answered after
    j2: JobOfferResult | None = None  # offered after SIGTERM (None: worker already gone)
    full_after: float | None = None  # SIGTERM -> first WS_FULL status
    disconnected_after: float | None = None  # SIGTERM -> worker websocket closed
    exit_code: int | None = None  # None: still running at the bound (then SIGKILLed)
    exit_after: float | None = None  # SIGTERM -> process exit
    j1_statuses: list[str] = field(default_factory=list)
    j1_end_after: float | None = None  # SIGTERM -> J1's entrypoint returned
    j1_shutdown_reason: str | None = None
    user_handler_calls: int = 0
    safeclose_warnings: list[str] = field(default_factory=list)
    group_left: list[int] = field(default_factory=list)  # processes alive after the exit
    job_proc_sigterm: str = ""  # J1's job process SIGTERM disposition while it runs

    def summary(self) -> str:
        def _f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        def _a(r: JobOfferResult | None) -> str:
            return "-" if r is None else str(r.accepted)

        return (
            f"{self.scenario.name}[{'patched' if self.patched else 'vanilla'}]: "
            f"reg={_f(self.registered_after)} j1={_a(self.j1)} inflight={_a(self.inflight)} "
            f"j2={_a(self.j2)} full={_f(self.full_after)} ws_closed={_f(self.disconnected_after)} "
            f"exit={self.exit_code}@{_f(self.exit_after)} j1={self.j1_statuses} "
            f"j1_end={_f(self.j1_end_after)} j1_reason={self.j1_shutdown_reason!r} "
            f"user_calls={self.user_handler_calls} warnings={len(self.safeclose_warnings)}"
        )


def run(scenario: Scenario, *, patched: bool, log_dir: Path) -> Outcome:
    log_path = log_dir / f"{scenario.name}-{'patched' if patched else 'vanilla'}.log"
    out = Outcome(scenario=scenario, patched=patched, log_path=log_path)
    env = {
        "SC_PATCHES": PATCHES if patched else "",
        "SC_HANDLER": scenario.handler,
        "SC_REQUEST_BLOCK": str(scenario.request_block),
        "SC_LATE_ACCEPT": str(scenario.late_accept),
        "SC_JOB_SECONDS": str(scenario.job_seconds),
        "SC_IDLE": "1",
    }
    pool = concurrent.futures.ThreadPoolExecutor(2)
    sigterm_at = 0.0
    with DispatchServer(api_key=API_KEY, api_secret=API_SECRET) as d:
        w = WorkerProcess("scenario_agent.py", d.url, log_path, env=env)
        try:
            w.start()
            conn = d.wait_registered(30)
            out.registered_after = conn.registered_at - w.started_at
            if scenario.handler.endswith("_started"):
                if w.wait_mark("installed", 10) is None:
                    raise AssertionError(f"handler not installed; see {log_path}")
                if scenario.handler.startswith("aiohttp"):
                    w.wait_mark("aiohttp_started", 10)

            if scenario.request_block:
                # J1's request_fnc blocks the loop; SIGTERM and J2 arrive while it is blocked
                f1 = pool.submit(d.offer_job, scenario.request_block + 8)
                if w.wait_mark("request", 10) is None:
                    raise AssertionError(f"request_fnc never ran; see {log_path}")
                time.sleep(min(0.8, scenario.request_block / 3))
                sigterm_at = w.send(signal.SIGTERM)
                time.sleep(scenario.j2_delay)
                f2 = pool.submit(d.offer_job, scenario.request_block + 5)
                out.j1, out.j2 = f1.result(), f2.result()
            else:
                out.j1 = d.offer_job(5)
                started = w.wait_mark(f"job_start {out.j1.job_id}", 10)
                if not out.j1.accepted or started is None:
                    raise AssertionError(f"J1 did not start; see {log_path}")
                out.job_proc_sigterm = w.signal_disposition(started.pid, signal.SIGTERM)
                if scenario.handler.endswith("_request"):
                    w.wait_mark("installed", 5)
                f_inflight = None
                if scenario.late_accept:
                    f_inflight = pool.submit(d.offer_job, scenario.late_accept + 5)
                    deadline = time.monotonic() + 10
                    while sum(m.text.startswith("request ") for m in w.marks()) < 2:
                        if time.monotonic() > deadline:
                            raise AssertionError(f"second request never ran; see {log_path}")
                        time.sleep(0.02)
                    time.sleep(scenario.late_accept / 3)
                sigterm_at = w.send(signal.SIGTERM)
                time.sleep(scenario.j2_delay)
                if d.connected_workers():
                    out.j2 = d.offer_job(3)
                if f_inflight is not None:
                    out.inflight = f_inflight.result()

            full = d.wait_worker_status("FULL", 3.0, since=sigterm_at)
            out.full_after = None if full is None else full.at - sigterm_at
            out.exit_code = w.wait(max(0.1, sigterm_at + scenario.exit_bound - time.monotonic()))
            if w.exited_at is not None:
                out.exit_after = w.exited_at - sigterm_at
                out.group_left = w.group_left()
        finally:
            w.kill_group()
            pool.shutdown(wait=False, cancel_futures=True)

        gone = conn.disconnected_at if d.wait_disconnected(conn.worker_id, 2.0) else None
        out.disconnected_after = None if gone is None else gone - sigterm_at
        if out.j1 is not None:
            out.j1_statuses = [s.status for s in d.job_statuses(out.j1.job_id)]
            end = w.wait_mark(f"job_end {out.j1.job_id}", 0)
            out.j1_end_after = None if end is None else end.at - sigterm_at
            shut = w.wait_mark(f"job_shutdown {out.j1.job_id}", 0)
            out.j1_shutdown_reason = None if shut is None else shut.text.split("reason=", 1)[1]
        out.user_handler_calls = sum(
            1 for m in w.marks() if m.text.startswith(("user_handler", "user_loop_callback"))
        )
        out.safeclose_warnings = [
            str(r.get("message"))
            for r in w.records()
            if r.get("name") == "livekit.agents.safeclose" and r.get("level") == "WARNING"
        ]
    return out


def run_pair(scenario: Scenario, log_dir: Path) -> tuple[Outcome, Outcome]:
    """The vanilla and the patched worker side by side (halves the suite's wall time)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fv = pool.submit(run, scenario, patched=False, log_dir=log_dir)
        fp = pool.submit(run, scenario, patched=True, log_dir=log_dir)
        return fv.result(), fp.result()


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        # (a) no user handler
        Scenario("plain"),
        # (b) signal.signal(SIGTERM, h) after the CLI set its handler
        Scenario("signal_in_request_fnc", handler="signal_request"),
        Scenario("signal_in_worker_started", handler="signal_started"),
        # (c) loop.add_signal_handler(SIGTERM, cb) after the CLI set its handler
        Scenario("loop_handler_in_request_fnc", handler="loop_request"),
        # (d) SIGTERM and J2 arrive while J1's request_fnc blocks the loop for 3 s
        Scenario("blocked_request_fnc", request_block=3.0, exit_bound=6.0),
        # (d') a request whose request_fnc is still awaiting when SIGTERM arrives
        Scenario("late_accept", late_accept=1.2, exit_bound=5.0),
        # (e) a user handler that raises: sys.exit, aiohttp's GracefulExit
        Scenario("raising_handler", handler="raise_request"),
        Scenario("aiohttp_graceful_exit", handler="aiohttp_started"),
    )
}
