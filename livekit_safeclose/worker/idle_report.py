"""What keeps a worker busy once its sessions ended: its process tree and what each costs.

Read with ``psutil`` (a livekit-agents dependency), so it works off Linux too: RSS, USS and
PSS (``memory_full_info()``, ``None`` where the platform or permissions do not give them),
CPU over a sampling interval, threads, command line and age of every process under the
worker's main process. Inside the worker the ``AgentServer``'s process pool tells idle
prewarmed processes from running jobs; from outside (``--pid``) job processes are listed as
``job-or-idle``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import servers

_MB = 2**20
#: psutil's status strings as the one-letter states of ``ps``
_STATES = {
    "running": "R",
    "sleeping": "S",
    "disk-sleep": "D",
    "stopped": "T",
    "tracing-stop": "t",
    "zombie": "Z",
    "dead": "X",
    "wake-kill": "K",
    "waking": "W",
    "idle": "I",
    "locked": "L",
    "waiting": "W",
    "parked": "P",
}


@dataclass
class ProcInfo:
    """One process of a worker's tree.

    ``role``: ``main`` (the worker), ``idle`` (a prewarmed job process waiting for a job),
    ``job`` (running ``job_id``, or finishing it), ``starting`` (not initialized yet),
    ``inference`` (the inference process), ``forkserver``, ``resource_tracker``
    (multiprocessing's), or, read from outside the worker where the pool cannot be seen,
    ``job-or-idle`` (a job process; which one is unknown) and ``other``. ``rss_mb`` counts
    pages shared with the forkserver in every process; ``pss_mb`` (shared pages split between
    their users) and ``uss_mb`` (private pages: what ending the process frees) are ``None``
    where the platform does not give them. ``cpu_percent`` is over the sampling interval."""

    pid: int
    ppid: int
    role: str
    job_id: str | None
    state: str
    rss_mb: float
    pss_mb: float | None
    uss_mb: float | None
    cpu_seconds: float
    cpu_percent: float | None
    age_seconds: float
    threads: int
    cmdline: str


@dataclass
class IdleReport:
    """A worker's process tree and what each process costs (see :func:`idle_report`)."""

    main_pid: int
    interval: float
    processes: list[ProcInfo]
    classified: bool
    num_idle_processes: int | None = None

    def by_role(self, role: str) -> list[ProcInfo]:
        return [p for p in self.processes if p.role == role]

    @staticmethod
    def _sum(procs: list[ProcInfo], attr: str) -> float | None:
        values = [getattr(p, attr) for p in procs]
        if any(v is None for v in values):
            return None
        return round(float(sum(values)), 1)

    def totals(self, role: str) -> dict[str, Any]:
        procs = self.by_role(role)
        return {
            "count": len(procs),
            "rss_mb": self._sum(procs, "rss_mb") or 0.0,
            "pss_mb": self._sum(procs, "pss_mb"),
            "uss_mb": self._sum(procs, "uss_mb"),
            "cpu_percent": self._sum(procs, "cpu_percent"),
        }

    def _head(self) -> str:
        idle = self.totals("idle" if self.classified else "job-or-idle")
        setting = (
            "" if self.num_idle_processes is None else f" (num_idle_processes={self.num_idle_processes})"
        )
        label = "idle prewarmed" if self.classified else "job processes (idle or running: pool not visible)"
        cpu = "?" if idle["cpu_percent"] is None else format(idle["cpu_percent"], ".1f")
        head = (
            f"worker {self.main_pid}: {len(self.processes)} process(es); {idle['count']} {label}{setting} "
            f"hold {_mb(idle['rss_mb'])} MB RSS, {_mb(idle['pss_mb'])} MB PSS, {_mb(idle['uss_mb'])} MB USS, "
            f"{cpu}% CPU"
        )
        if self.classified:
            jobs = self.by_role("job")
            head += f"; {len(jobs)} job process(es)" + (
                f" ({', '.join(str(p.job_id) for p in jobs)})" if jobs else ""
            )
        return head

    def summary(self) -> str:
        rows = [
            self._head(),
            "    pid  role          job            rss MB  pss MB  uss MB   cpu%    cpu s    age s  st  thr",
        ]
        for p in self.processes:
            cpu = "-" if p.cpu_percent is None else f"{p.cpu_percent:.1f}"
            rows.append(
                f"  {p.pid:>5}  {p.role:<12}  {(p.job_id or '-')[:13]:<13}  {p.rss_mb:>6.0f}  {_mb(p.pss_mb):>6}  "
                f"{_mb(p.uss_mb):>6}  {cpu:>5}  {p.cpu_seconds:>7.1f}  {p.age_seconds:>7.0f}  {p.state:>2}  {p.threads:>3}"
            )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["idle"] = self.totals("idle" if self.classified else "job-or-idle")
        return out


def _mb(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}"


# -- the worker's own view of its pool (read on its loop) ----------------------------------

Roles = dict[int, tuple[str, "str | None"]]


def _initialized(proc: Any) -> bool:
    init = getattr(proc, "_initialize_fut", None)
    return init is not None and init.done() and not init.cancelled() and init.exception() is None


def _pool_roles(server: Any) -> tuple[Roles, int | None]:
    """pid -> (role, job id) from the worker's process pool, and ``num_idle_processes``. Reads
    the optional ``IDLE_REPORT`` rows with defaults: a missing one narrows the report."""
    roles: Roles = {}
    pool = getattr(server, "_proc_pool", None)
    for proc in list(getattr(pool, "processes", None) or []):
        pid = getattr(proc, "pid", None)
        if pid is None:
            continue
        running = getattr(proc, "running_job", None)
        if running is not None:
            roles[pid] = ("job", str(getattr(getattr(running, "job", None), "id", "?")))
        else:
            roles[pid] = ("idle", None) if _initialized(proc) else ("starting", None)
    inference_pid = getattr(getattr(server, "_inference_executor", None), "pid", None)
    if inference_pid is not None:
        roles[inference_pid] = ("inference", None)
    setting = getattr(pool, "_default_num_idle_processes", None)
    return roles, setting if isinstance(setting, int) else None


# -- sampling with psutil ------------------------------------------------------------------


def _tree(root: Any) -> list[Any]:
    """``root`` and its descendants, breadth first, children by pid."""
    import psutil

    try:
        below = root.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        below = []
    kids: dict[int, list[Any]] = {}
    for p in below:
        try:
            kids.setdefault(p.ppid(), []).append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    out, todo = [], [root]
    while todo:
        proc = todo.pop(0)
        out.append(proc)
        todo.extend(sorted(kids.get(proc.pid, []), key=lambda p: int(p.pid)))
    return out


def _cpu(proc: Any) -> float | None:
    import psutil

    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return float(t.user + t.system)


def _memory(proc: Any) -> tuple[float, float | None, float | None]:
    """(RSS, PSS, USS) in MB; PSS/USS are None where ``memory_full_info()`` lacks them."""
    import psutil

    try:
        full = proc.memory_full_info()
    except (psutil.AccessDenied, psutil.ZombieProcess, NotImplementedError, OSError):
        full = proc.memory_info()
    pss, uss = getattr(full, "pss", None), getattr(full, "uss", None)
    return full.rss / _MB, None if pss is None else pss / _MB, None if uss is None else uss / _MB


def _cmdline(proc: Any) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())[:200]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _role(pid: int, ppid: int, cmd: str, ctx: _Sampler) -> tuple[str, str | None]:
    if pid == ctx.main_pid:
        return "main", None
    if ctx.roles is not None and pid in ctx.roles:
        return ctx.roles[pid]
    if ppid in ctx.forkservers:
        return ("job-or-idle" if ctx.roles is None else "other"), None
    if pid in ctx.forkservers:
        return "forkserver", None
    return ("resource_tracker" if "resource_tracker" in cmd else "other"), None


class _Sampler:
    """The tree and its CPU times at the start of the interval; :meth:`finish` reads the rest."""

    def __init__(self, main_pid: int, roles: Roles | None) -> None:
        import psutil

        self.main_pid = main_pid
        self.roles = roles
        self.procs = _tree(psutil.Process(main_pid))
        self.t0 = time.monotonic()
        self.cpu0 = {p.pid: c for p in self.procs if (c := _cpu(p)) is not None}
        self.forkservers: set[int] = set()

    def _info(self, proc: Any, interval: float, elapsed: float) -> ProcInfo | None:
        import psutil

        try:
            with proc.oneshot():
                ppid, status, threads, started = (
                    proc.ppid(),
                    proc.status(),
                    proc.num_threads(),
                    proc.create_time(),
                )
                cmd = _cmdline(proc)
                rss, pss, uss = _memory(proc)
                cpu = _cpu(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        role, job_id = _role(proc.pid, ppid, cmd, self)
        pct: float | None = None
        if interval > 0 and elapsed > 0 and cpu is not None and proc.pid in self.cpu0:
            pct = round(100.0 * (cpu - self.cpu0[proc.pid]) / elapsed, 1)
        return ProcInfo(
            pid=proc.pid,
            ppid=ppid,
            role=role,
            job_id=job_id,
            state=_STATES.get(status, status),
            rss_mb=round(rss, 1),
            pss_mb=None if pss is None else round(pss, 1),
            uss_mb=None if uss is None else round(uss, 1),
            cpu_seconds=round(cpu or 0.0, 2),
            cpu_percent=pct,
            age_seconds=round(max(0.0, time.time() - started), 1),
            threads=threads,
            cmdline=cmd,
        )

    def finish(self, interval: float, setting: int | None) -> IdleReport:
        elapsed = time.monotonic() - self.t0
        alive = [p for p in self.procs if p.is_running()]
        self.forkservers = {p.pid for p in alive if p.pid != self.main_pid and "forkserver" in _cmdline(p)}
        procs = [info for p in alive if (info := self._info(p, interval, elapsed)) is not None]
        return IdleReport(
            main_pid=self.main_pid,
            interval=round(elapsed, 3) if interval > 0 else 0.0,
            processes=procs,
            classified=self.roles is not None,
            num_idle_processes=setting,
        )


def _start(server: Any, pid: int | None) -> tuple[_Sampler, int | None]:
    srv = servers.the_server(server) if pid is None else server
    roles, setting = _pool_roles(srv) if srv is not None else (None, None)
    return _Sampler(os.getpid() if pid is None else pid, roles), setting


def idle_report(server: Any = None, *, pid: int | None = None, interval: float = 0.5) -> IdleReport:
    """What a worker's processes cost: every process under the worker's main process with its
    role, memory (RSS, PSS, USS) and CPU (total, and percent over ``interval`` seconds; ``0``
    skips the sampling).

    Inside the worker, pass the ``AgentServer`` (or let the patches' record of it be used) to
    tell idle prewarmed processes from running jobs; this blocks for ``interval``, so from the
    worker's event loop use :func:`aidle_report`. From outside (``pid`` = the worker's main pid,
    e.g. ``livekit-safeclose idle-report --pid PID``) job processes are listed as
    ``job-or-idle``: the pool's bookkeeping is not visible there."""
    sampler, setting = _start(server, pid)
    if interval > 0:
        time.sleep(interval)
    return sampler.finish(interval, setting)


async def aidle_report(server: Any = None, *, interval: float = 0.5) -> IdleReport:
    """:func:`idle_report` for the worker's own event loop (sleeps instead of blocking)."""
    sampler, setting = _start(server, None)
    if interval > 0:
        await asyncio.sleep(interval)
    return sampler.finish(interval, setting)


# -- the command ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``idle-report`` options (shared by ``livekit-safeclose`` and ``python -m
    livekit_safeclose.worker``)."""
    parser.add_argument("--pid", type=int, required=True, help="the worker's main process id")
    parser.add_argument("--interval", type=float, default=1.0, help="CPU sampling interval, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import psutil

    if args.interval < 0:
        parser.error("--interval must be >= 0")
    if not psutil.pid_exists(args.pid):
        parser.error(f"no process {args.pid}")
    report = idle_report(pid=args.pid, interval=args.interval)
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m livekit_safeclose.worker idle-report --pid PID [--interval S] [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m livekit_safeclose.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("idle-report", help="what a running worker's processes cost")
    add_arguments(rep)
    args = parser.parse_args(argv)
    return run_command(args, rep)
