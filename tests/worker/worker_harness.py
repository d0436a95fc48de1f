"""Run real livekit-agents worker processes against the stand-in dispatch server.

Each worker runs in its own session (process group), so a ``finally`` can SIGKILL the worker,
its forkserver and its job processes together. Output goes to a log file for assertions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AGENTS_DIR = Path(__file__).parent / "agents"
REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "safeclose-test-key"
API_SECRET = "safeclose-test-secret-0123456789abcdef"  # >= 32 bytes: no PyJWT warning

_MARK_RE = re.compile(r"^SCMARK (?P<t>[0-9.]+) (?P<pid>\d+) (?P<text>.*)$")


def pid_alive(pid: int | None) -> bool:
    """``pid`` runs (a zombie, exited but not reaped, does not)."""
    if pid is None:
        return False
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return data[data.rindex(")") + 2 :].split()[0] != "Z"


@dataclass(frozen=True)
class Mark:
    """A ``SCMARK`` line printed by a test agent (``at`` is ``time.monotonic()``)."""

    at: float
    pid: int
    text: str


class WorkerProcess:
    """``python <agent> start --url ...`` as a subprocess with a hard kill on exit."""

    def __init__(
        self,
        agent: str,
        url: str,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        drain_timeout: int | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.agent_path = AGENTS_DIR / agent
        self.url = url
        self.log_path = log_path
        self.drain_timeout = drain_timeout
        self.log_level = log_level
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.exited_at: float | None = None

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.kill_group()

    def start(self) -> None:
        args = [
            sys.executable,
            str(self.agent_path),
            "start",
            "--url",
            self.url,
            "--api-key",
            API_KEY,
            "--api-secret",
            API_SECRET,
            "--log-level",
            self.log_level,
        ]
        if self.drain_timeout is not None:
            args += ["--drain-timeout", str(self.drain_timeout)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
        for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "LIVEKIT_AGENT_NAME"):
            env.pop(k, None)
        env.update(self.env)
        log = open(self.log_path, "wb")  # handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(REPO_ROOT),
                start_new_session=True,
            )
        finally:
            log.close()
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, sig: int) -> float:
        """Signal the worker's main process only (what an orchestrator does); returns when."""
        at = time.monotonic()
        os.kill(self.pid, sig)
        return at

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after ``timeout``."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def poll(self) -> int | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def kill_group(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def group_alive(self) -> list[int]:
        """PIDs still in the worker's process group (job processes, forkserver...)."""
        out: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == self.pid:
                out.append(int(entry.name))
        return out

    def group_left(self, grace: float = 2.0) -> list[int]:
        """PIDs of the group still alive ``grace`` seconds after the worker's exit: a child
        (the forkserver, a job process) sees its parent's pipe close and exits on its own a
        moment later, longer on a loaded machine; one alive past the grace is left behind."""
        deadline = time.monotonic() + grace
        while (alive := self.group_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return alive

    def signal_disposition(self, pid: int, sig: int) -> str:
        """``"ignored"``, ``"caught"`` or ``"default"``, from ``/proc/<pid>/status``."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        bit = 1 << (sig - 1)
        if int(fields["SigIgn"], 16) & bit:
            return "ignored"
        if int(fields["SigCgt"], 16) & bit:
            return "caught"
        return "default"

    # -- log access ------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def marks(self) -> list[Mark]:
        out: list[Mark] = []
        for line in self.log_text().splitlines():
            m = _MARK_RE.match(line)
            if m:
                out.append(Mark(float(m["t"]), int(m["pid"]), m["text"]))
        return out

    def has_mark(self, prefix: str) -> bool:
        return any(m.text.startswith(prefix) for m in self.marks())

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records the worker (and its jobs, via the log queue) printed."""
        out: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_mark(self, prefix: str, timeout: float) -> Mark | None:
        deadline = time.monotonic() + timeout
        while True:
            done = time.monotonic() >= deadline or self.poll() is not None
            for m in self.marks():
                if m.text.startswith(prefix):
                    return m
            if done:
                return None
            time.sleep(0.05)
