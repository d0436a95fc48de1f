"""The layer's Prometheus metrics on a real worker's own ``/metrics`` endpoint.

A real worker (``agents/session_agent.py``) serves livekit-agents' endpoint (``prometheus_port``)
in multiprocess mode (``prometheus_multiproc_dir``); its job runs a real AgentSession whose
scripted LLM calls a tool that parks forever, then force-closes it (``session.aclose()``). The
close happens in the job process; the scrape, in the worker's main process, must show it.
Vanilla: the same worker and job serve upstream's metrics and none of the layer's. The layer's
worker sets only the ``prometheus_multiproc_dir`` option (no environment variable): the job
process, forked from the forkserver the worker starts after setting the variable, writes its
metrics to the directory.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from worker_harness import API_KEY, API_SECRET, WorkerProcess

from livekit_safeclose.testing.dispatch import DispatchServer
from livekit_safeclose.testing.standins import LLMReply, ProviderServer

_EXPOSED_RE = re.compile(r"metrics exposed at (http://127\.0\.0\.1:\d+/metrics)")
_SAMPLE_RE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@dataclass
class Scrape:
    text: str
    closed: bool  # the job's forced close returned

    def value(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` whose labels include ``labels``, summed over the rest."""
        total, seen = 0.0, False
        for line in self.text.splitlines():
            m = _SAMPLE_RE.match(line)
            if not m or m["name"] != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total, seen = total + float(m["value"]), True
        return total if seen else None


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as r:
        return str(r.read().decode())


def _scrape(patched: bool, tmp: Path) -> Scrape:
    prom_dir = tmp / f"prom-{'layer' if patched else 'vanilla'}"
    log = tmp / f"metrics-{'layer' if patched else 'vanilla'}.log"
    with ProviderServer() as prov, DispatchServer(api_key=API_KEY, api_secret=API_SECRET) as d:
        prov.script_llm(LLMReply(tool_calls=[("lookup", {})]))
        env = {
            "SC_LAYER": "1" if patched else "",
            "SC_DRAIN": "0.5",
            "SC_CLOSE": "3",
            "SC_PROVIDER": prov.base_url,
            "SC_MODE": "stuck_tool_aclose",
            "SC_JOB_SECONDS": "30",  # the job (and its gauges) live on past the scrape
            "SC_PROM_DIR": str(prom_dir),
        }
        if not patched:
            # the worker's own process writes to the directory too (prometheus_client reads the
            # variable at import): upstream's lk_agents_* metrics show the endpoint serves
            env["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
        with WorkerProcess("session_agent.py", d.url, log, env=env) as w:
            d.wait_registered(45)
            m = _EXPOSED_RE.search(w.log_text())
            assert m, f"no /metrics endpoint logged; see {log}"
            job = d.offer_job(10)
            assert w.wait_mark(f"tool_parked {job.job_id}", 30), f"the tool never parked; see {log}"
            closed = w.wait_mark(f"session_aclosed {job.job_id}", 5 if patched else 1.5) is not None
            text = _get(m[1])
            deadline = time.monotonic() + 3
            while patched and "lk_safeclose_closes_total{" not in text and time.monotonic() < deadline:
                time.sleep(0.1)
                text = _get(m[1])
            (tmp / f"scrape-{'layer' if patched else 'vanilla'}.txt").write_text(text)
            return Scrape(text, closed)


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Scrape]:
    tmp = tmp_path_factory.mktemp("metrics")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {patched: pool.submit(_scrape, patched, tmp) for patched in (False, True)}
        return {patched: f.result() for patched, f in futures.items()}


@pytest.mark.timeout(90)
def test_vanilla_worker_metrics_have_no_close_metrics(scrapes: dict[bool, Scrape]) -> None:
    s = scrapes[False]
    assert not s.closed  # vanilla: the forced close waits on the parked tool
    assert "lk_agents_" in s.text  # upstream's own metrics are served
    assert "lk_safeclose_" not in s.text


@pytest.mark.timeout(90)
def test_layer_forced_close_in_job_reaches_worker_metrics(scrapes: dict[bool, Scrape]) -> None:
    s = scrapes[True]
    assert s.closed
    assert s.value("lk_safeclose_closes_total", outcome="forced") == 1.0, s.text
    assert s.value("lk_safeclose_closes_total", outcome="clean") is None
    assert s.value("lk_safeclose_stuck_tasks_total", kind="tool") == 1.0
    assert s.value("lk_safeclose_close_duration_seconds_count", outcome="forced") == 1.0
    assert s.value("lk_safeclose_zombie_tasks") == 0.0
    # the job's session closed its STT/TTS/LLM streams: the live gauge is back to 0
    assert s.value("lk_safeclose_open_streams") == 0.0


def _gauges_after_job_exit(patched: bool, tmp: Path) -> tuple[list[str], list[str]]:
    """A short healthy job in multiprocess mode: the job process's live-gauge files while it
    runs, and once it has exited."""
    prom_dir = tmp / f"prom-exit-{'layer' if patched else 'vanilla'}"
    prom_dir.mkdir()
    log = tmp / f"exit-{'layer' if patched else 'vanilla'}.log"
    with ProviderServer() as prov, DispatchServer(api_key=API_KEY, api_secret=API_SECRET) as d:
        env = {
            "SC_LAYER": "1" if patched else "",
            "SC_PROVIDER": prov.base_url,
            "SC_MODE": "healthy",
            "SC_JOB_SECONDS": "1",
            "SC_PROM_DIR": str(prom_dir),
            "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
        }
        with WorkerProcess("session_agent.py", d.url, log, env=env) as w:
            d.wait_registered(45)
            job = d.offer_job(10)
            started = w.wait_mark(f"session_started {job.job_id}", 30)
            assert started, f"the job never started its session; see {log}"
            pid = started.pid
            live = sorted(p.name for p in prom_dir.glob(f"gauge_live*_{pid}.db"))
            assert w.wait_mark(f"job_end {job.job_id}", 15), f"the job never ended; see {log}"
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and psutil.pid_exists(pid):
                time.sleep(0.1)
            assert not psutil.pid_exists(pid), "the job process never exited"
            time.sleep(1.0)  # the worker's supervisor sees the exit (a hang is a hang)
            left = sorted(p.name for p in prom_dir.glob(f"gauge_live*_{pid}.db"))
            return live, left


@pytest.mark.timeout(120)
def test_dead_job_process_gauges_are_dropped(tmp_path: Path) -> None:
    """prometheus_client keeps a dead process's live-gauge file until told. A vanilla job
    process writes none; the layer's job writes its stream gauge (``livesum``), so without
    the drop every job would leave a file in the multiprocess directory, its last values
    still summed into ``lk_safeclose_open_streams``. The layer leaves what vanilla leaves."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {
            patched: pool.submit(_gauges_after_job_exit, patched, tmp_path) for patched in (False, True)
        }
        (v_live, v_left), (l_live, l_left) = futures[False].result(), futures[True].result()
    assert v_live == v_left == [], (v_live, v_left)
    assert l_live, "the layer's job wrote no live gauge: nothing was tested"
    assert l_left == [], l_left
