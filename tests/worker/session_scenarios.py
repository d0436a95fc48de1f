"""Real worker processes whose job runs a real AgentSession against the stand-in providers.

Timeline: a ProviderServer (stand-in inference STT/TTS, OpenAI LLM) and a DispatchServer start;
the worker (``agents/session_agent.py``) registers; job J1 is offered and its session opens an
inference STT websocket (``stuck_tool``: the scripted LLM calls a tool that never returns);
SIGTERM goes to the worker's main process (and a second one ``second_signal_after`` later);
then we poll, every 50 ms, the provider's view (open STT connections, goodbyes), J1's process
and the worker, until the worker exited (with the layer: bounded far past what the tests allow)
or, vanilla, ``observe`` seconds after SIGTERM; whatever is left is then SIGKILLed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker_harness import API_KEY, API_SECRET, WorkerProcess, pid_alive

from livekit_safeclose import worker as safeclose_worker
from livekit_safeclose.testing.dispatch import DispatchServer
from livekit_safeclose.testing.standins import LLMReply, ProviderServer

STT = "inference_stt"
LAYER_DRAIN = 1.0  # the layer's drain_timeout in the job (forced close lets speech settle this long)
LAYER_CLOSE = 4.0  # the layer's close_timeout (>= drain + transcript wait 0.3 s + reserves)


@dataclass(frozen=True)
class SessionScenario:
    name: str
    mode: str = "stuck_tool"  # SC_MODE of agents/session_agent.py
    drain_timeout: int = 2  # the worker's --drain-timeout
    second_signal_after: float | None = None  # seconds after SIGTERM
    job_seconds: float = 2.0  # healthy jobs only
    observe: float = 8.0  # vanilla: seconds after SIGTERM we watch before killing what is left
    idle: int = 1
    idle_report: bool = False
    #: the layer's install(force_close_on_second_signal=...)
    force_close_on_second_signal: bool = False
    #: stuck scenarios run as a vanilla/layer pair unless False
    pair: bool = True


@dataclass
class SessionOutcome:
    scenario: SessionScenario
    patched: bool
    log_path: Path
    registered_after: float = 0.0
    job_id: str = ""
    job_pid: int | None = None
    stt_open_at_signal: int = 0
    stt_closed_after: float | None = None  # SIGTERM -> the provider holds no STT connection
    stt_clean: int = 0  # STT connections that ended with a goodbye (`session.close`)
    stt_open_at_end: int = 0
    job_exit_after: float | None = None  # SIGTERM -> J1's process gone
    exit_code: int | None = None  # None: still running at the end of the observation
    exit_after: float | None = None  # SIGTERM -> worker exit
    statuses: list[str] = field(default_factory=list)
    shutdown_reason: str | None = None
    job_end_after: float | None = None
    session_closed_after: float | None = None
    warnings: list[tuple[int, str]] = field(default_factory=list)  # (pid, message) of safeclose WARNINGs
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    idle_in_worker: dict[str, Any] | None = None
    idle_outside: safeclose_worker.IdleReport | None = None
    group_left: list[int] = field(default_factory=list)

    def summary(self) -> str:
        def _f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}s"

        return (
            f"{self.scenario.name}[{'layer' if self.patched else 'vanilla'}]: reg={_f(self.registered_after)} "
            f"stt_open@signal={self.stt_open_at_signal} stt_closed={_f(self.stt_closed_after)} "
            f"stt_clean={self.stt_clean} stt_open@end={self.stt_open_at_end} "
            f"job_exit={_f(self.job_exit_after)} exit={self.exit_code}@{_f(self.exit_after)} "
            f"statuses={self.statuses} reason={self.shutdown_reason!r} "
            f"session_closed={_f(self.session_closed_after)} warnings={len(self.warnings)}"
        )


def run(sc: SessionScenario, *, patched: bool, log_dir: Path) -> SessionOutcome:
    log_path = log_dir / f"{sc.name}-{'layer' if patched else 'vanilla'}.log"
    out = SessionOutcome(scenario=sc, patched=patched, log_path=log_path)
    with ProviderServer() as prov, DispatchServer(api_key=API_KEY, api_secret=API_SECRET) as d:
        if sc.mode == "stuck_tool":
            prov.script_llm(LLMReply(tool_calls=[("lookup", {})]))
        env = {
            "SC_LAYER": "1" if patched else "",
            "SC_DRAIN": str(LAYER_DRAIN),
            "SC_CLOSE": str(LAYER_CLOSE),
            "SC_PROVIDER": prov.base_url,
            "SC_MODE": sc.mode,
            "SC_JOB_SECONDS": str(sc.job_seconds),
            "SC_IDLE": str(sc.idle),
            "SC_SECOND_CLOSE": "1" if sc.force_close_on_second_signal else "",
        }
        w = WorkerProcess("session_agent.py", d.url, log_path, env=env, drain_timeout=sc.drain_timeout)
        try:
            w.start()
            conn = d.wait_registered(30)
            out.registered_after = conn.registered_at - w.started_at
            j1 = d.offer_job(10)
            out.job_id = j1.job_id
            started = w.wait_mark(f"job_start {j1.job_id}", 20)
            if not j1.accepted or started is None:
                raise AssertionError(f"J1 did not start; see {log_path}")
            out.job_pid = started.pid
            ready = "tool_parked" if sc.mode == "stuck_tool" else "session_started"
            if w.wait_mark(f"{ready} {j1.job_id}", 20) is None or not prov.wait_open(STT, 1, 10):
                raise AssertionError(f"J1's session never got going ({ready}); see {log_path}")
            if sc.idle_report:
                d.offer_job(10, room="idle-report-1")
                rep = w.wait_mark("idle_report ", 10)
                out.idle_in_worker = None if rep is None else json.loads(rep.text.split(" ", 1)[1])
                out.idle_outside = safeclose_worker.idle_report(pid=w.pid, interval=0.3)
            clean0 = prov.clean_closes(STT)
            out.stt_open_at_signal = prov.open_connections(STT)

            # the layer: watch until the exit (bounded well past what the test allows);
            # vanilla: a bounded look, then SIGKILL
            limit = sc.observe
            if patched:
                limit = sc.drain_timeout + safeclose_worker.proc_close_bound(LAYER_CLOSE) + 3.0
                if sc.second_signal_after is not None and not sc.force_close_on_second_signal:
                    limit = sc.second_signal_after + sc.observe  # exits at once, as upstream
                elif sc.second_signal_after is not None:
                    limit = sc.second_signal_after + safeclose_worker.proc_close_bound(LAYER_CLOSE) + 3.0
                if sc.mode == "healthy":
                    limit = max(limit, sc.observe)
            sigterm_at = w.send(signal.SIGTERM)
            second_sent = sc.second_signal_after is None
            while True:
                now = time.monotonic()
                if not second_sent and now >= sigterm_at + (sc.second_signal_after or 0):
                    if w.poll() is None:
                        w.send(signal.SIGTERM)
                    second_sent = True
                if out.stt_closed_after is None and prov.open_connections(STT) == 0:
                    out.stt_closed_after = now - sigterm_at
                if out.job_exit_after is None and not pid_alive(out.job_pid):
                    out.job_exit_after = now - sigterm_at
                rc = w.poll()
                if rc is not None and w.exited_at is not None:
                    if out.exit_code is None:
                        out.exit_code = rc
                        out.exit_after = w.exited_at - sigterm_at
                    if now >= w.exited_at + 0.3:  # the provider's view settles
                        break
                if now >= sigterm_at + limit:
                    break
                time.sleep(0.05)
            out.stt_clean = prov.clean_closes(STT) - clean0
            out.stt_open_at_end = prov.open_connections(STT)
            if out.exit_code is not None:
                out.group_left = w.group_left()
        finally:
            w.kill_group()
            if out.job_pid is not None and pid_alive(out.job_pid):  # an orphan outside the group
                try:
                    os.kill(out.job_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

        out.statuses = [s.status for s in d.job_statuses(out.job_id)]
        shut = w.wait_mark(f"job_shutdown {out.job_id}", 0)
        out.shutdown_reason = None if shut is None else shut.text.split("reason=", 1)[1]
        end = w.wait_mark(f"job_end {out.job_id}", 0)
        out.job_end_after = None if end is None else end.at - sigterm_at
        closed = w.wait_mark(f"session_closed {out.job_id}", 0)
        out.session_closed_after = None if closed is None else closed.at - sigterm_at
        for r in w.records():
            if r.get("name") != "livekit.agents.safeclose":
                continue
            if r.get("level") == "WARNING":
                out.warnings.append((int(r.get("pid", 0)), str(r.get("message"))))
            if "safeclose_job_leftovers" in r:
                out.leftovers.append(r["safeclose_job_leftovers"])
    return out


def run_pair(sc: SessionScenario, log_dir: Path) -> tuple[SessionOutcome, SessionOutcome]:
    """Vanilla and layer side by side."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fv = pool.submit(run, sc, patched=False, log_dir=log_dir)
        fp = pool.submit(run, sc, patched=True, log_dir=log_dir)
        return fv.result(), fp.result()


SCENARIOS: dict[str, SessionScenario] = {
    s.name: s
    for s in (
        # (i) the drain times out while J1's tool is stuck
        SessionScenario("drain_timeout_stuck_tool", drain_timeout=2, observe=8.0),
        # (ii) a second SIGTERM during a long drain while J1's tool is stuck; the layer with
        # force_close_on_second_signal=True force-closes the session
        SessionScenario(
            "second_signal_stuck_tool",
            drain_timeout=60,
            second_signal_after=1.5,
            observe=4.0,
            force_close_on_second_signal=True,
        ),
        # (ii') the same with the layer's default: a second signal exits at once, as upstream
        SessionScenario(
            "second_signal_default", drain_timeout=60, second_signal_after=1.5, observe=4.0, pair=False
        ),
        # (iii) a healthy job longer than close_timeout, shorter than --drain-timeout
        SessionScenario(
            "healthy_long_job",
            mode="healthy",
            drain_timeout=15,
            job_seconds=LAYER_CLOSE + 2.5,
            observe=14.0,
            idle=2,
            idle_report=True,
        ),
    )
}
