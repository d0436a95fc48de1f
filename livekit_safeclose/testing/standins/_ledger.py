"""Connection bookkeeping: the per-kind counters and the event log tests assert on.

The server thread writes, the test thread reads, so every count and log append
happens under one lock. The set of live connections is touched only by the server
thread: shutdown walks it to abort whatever is still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiohttp import web

from ._types import KINDS, STT_KINDS, Kind

__all__ = ["Conn", "ConnectionLedger", "LogEntry"]


class LogEntry(NamedTuple):
    """One server-side event: (time.monotonic(), kind, event)."""

    t: float
    kind: str
    event: str


@dataclass
class _Counts:
    open: int = 0
    total: int = 0
    clean: int = 0
    rejected: int = 0


@dataclass(eq=False)
class Conn:
    """One request/connection as the server thread sees it.

    `clean` is set by the protocol when the client said goodbye; `server_closed`
    when the server ended it (quota refusal, idle close). `_release` turns both into
    the closing log entry and the clean-close count.
    """

    kind: Kind
    id: int
    ledger: ConnectionLedger = field(repr=False)
    task: asyncio.Task[Any] | None
    transport: asyncio.Transport | None
    ws: web.WebSocketResponse[bool] | None = None
    is_open: bool = False
    clean: bool = False
    server_closed: bool = False
    last_audio: float = field(default_factory=time.monotonic)
    helpers: set[asyncio.Task[Any]] = field(default_factory=set)

    def log(self, name: str, detail: str | None = None) -> None:
        """Log `name#id` (or `name#id:detail`), the shape every event name has."""
        suffix = "" if detail is None else f":{detail}"
        self.ledger.record(self.kind, f"{name}#{self.id}{suffix}")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a helper task that is cancelled when the connection is released or shut down."""
        task = asyncio.create_task(coro)
        self.helpers.add(task)
        task.add_done_callback(self.helpers.discard)
        return task


class ConnectionLedger:
    """Counters, event log and live connections of one `ProviderServer`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[Kind, _Counts] = {k: _Counts() for k in KINDS}
        self._log: list[LogEntry] = []
        self._ids = itertools.count(1)
        self.live: set[Conn] = set()  # server thread only

    # ---------------------------------------------------------------- server thread

    @contextlib.contextmanager
    def track(self, kind: Kind, request: web.Request) -> Iterator[Conn]:
        """Count a request for its whole handler; the release also runs on cancellation."""
        conn = Conn(
            kind=kind,
            id=next(self._ids),
            ledger=self,
            task=asyncio.current_task(),
            transport=request.transport,
        )
        self.live.add(conn)
        with self._lock:
            self._counts[kind].total += 1
            self._log.append(LogEntry(time.monotonic(), kind, f"request#{conn.id}"))
        try:
            yield conn
        finally:
            self._release(conn)

    def record(self, kind: Kind, event: str) -> None:
        with self._lock:
            self._log.append(LogEntry(time.monotonic(), kind, event))

    def reserve_open(self, conn: Conn, quota: int | None) -> bool:
        """Mark `conn` open unless its kind's STT quota is exhausted (check+increment is atomic)."""
        with self._lock:
            counts = self._counts[conn.kind]
            if conn.kind in STT_KINDS and quota is not None and counts.open >= quota:
                counts.rejected += 1
                return False
            counts.open += 1
            conn.is_open = True
            return True

    def count_rejected(self, conn: Conn) -> None:
        with self._lock:
            self._counts[conn.kind].rejected += 1

    def mark_open(self, conn: Conn) -> None:
        with self._lock:
            self._counts[conn.kind].open += 1
            conn.is_open = True

    def _release(self, conn: Conn) -> None:
        """Final accounting for a connection; synchronous so cancellation cannot skip it."""
        for h in conn.helpers:
            h.cancel()
        self.live.discard(conn)
        with self._lock:
            counts = self._counts[conn.kind]
            if conn.is_open:
                counts.open -= 1
                conn.is_open = False
            if conn.clean:
                counts.clean += 1
            how = "clean" if conn.clean else ("server" if conn.server_closed else "unclean")
            self._log.append(LogEntry(time.monotonic(), conn.kind, f"closed#{conn.id}:{how}"))

    # ---------------------------------------------------------------- any thread

    def open_connections(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].open

    def total_connections(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].total

    def clean_closes(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].clean

    def rejected(self, kind: Kind) -> int:
        with self._lock:
            return self._counts[kind].rejected

    def entries(self) -> list[LogEntry]:
        with self._lock:
            return list(self._log)

    def events(self, kind: Kind) -> list[str]:
        with self._lock:
            return [e.event for e in self._log if e.kind == kind]
