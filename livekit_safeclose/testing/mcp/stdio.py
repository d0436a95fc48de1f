"""The test side of the stdio MCP stand-in: the command the real ``MCPServerStdio`` runs,
and the child's status file, through which a test learns its pid and what it saw."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

#: how long :meth:`StdioStandin.wait_pid` waits for the child to report its pid
PID_TIMEOUT = 20.0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, has ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: signal 0 is all there is
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class StdioStandin:
    """One stdio MCP server child, as ``MCPServerStdio`` will start it. ``stubborn``: it
    ignores its stdin closing and SIGTERM (only SIGKILL ends it)."""

    def __init__(self, *, stubborn: bool = False) -> None:
        self.stubborn = stubborn
        fd, path = tempfile.mkstemp(prefix="safeclose-mcp-", suffix=".status")
        os.close(fd)
        self.status = Path(path)

    @property
    def command(self) -> str:
        return sys.executable

    @property
    def args(self) -> list[str]:
        args = ["-m", "livekit_safeclose.testing.mcp.stdio_server", "--status", str(self.status)]
        return args + (["--stubborn"] if self.stubborn else [])

    def events(self) -> list[str]:
        try:
            return [ln for ln in self.status.read_text().splitlines() if ln]
        except OSError:
            return []

    def count(self, prefix: str) -> int:
        return sum(e.startswith(prefix) for e in self.events())

    @property
    def pid(self) -> int | None:
        for line in self.events():
            if line.startswith("pid "):
                return int(line.split()[1])
        return None

    def wait_pid(self, timeout: float = PID_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while (pid := self.pid) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the stdio MCP stand-in never reported its pid")
            time.sleep(0.02)
        return pid

    def alive(self) -> bool:
        pid = self.pid
        return pid is not None and pid_alive(pid)

    def kill(self) -> None:
        """Test cleanup: SIGKILL the child (by its pid) if it still runs."""
        pid = self.pid
        if pid is not None and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            self.status.unlink()
