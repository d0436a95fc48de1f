"""What the stand-in dispatch server records: registrations, statuses, job offers.

Plain frozen records (times are ``time.monotonic()``), apart from the server so a test can
import and compare them without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from livekit.protocol import agent

#: the worker statuses by the names the tests use
WORKER_STATUS_NAMES = {
    agent.WorkerStatus.WS_AVAILABLE: "AVAILABLE",
    agent.WorkerStatus.WS_FULL: "FULL",
}


@dataclass(frozen=True)
class WorkerStatusUpdate:
    """One ``UpdateWorkerStatus`` as the worker sent it (``at`` is ``time.monotonic()``)."""

    worker_id: str
    status: str  # "AVAILABLE" | "FULL"
    load: float
    job_count: int
    at: float


@dataclass(frozen=True)
class JobStatusUpdate:
    """One ``UpdateJobStatus`` (``status`` is the enum name, e.g. ``"JS_RUNNING"``)."""

    worker_id: str
    job_id: str
    status: str
    error: str
    at: float


@dataclass(frozen=True)
class JobOfferResult:
    """Outcome of :meth:`DispatchServer.offer_job`.

    ``accepted`` is true only if the worker answered ``available=True`` and the assignment was
    sent. ``responded`` is false if the worker never answered within the timeout.
    """

    job_id: str
    accepted: bool
    responded: bool
    terminate: bool = False
    participant_identity: str = ""
    answered_at: float | None = None


@dataclass
class WorkerConnection:
    """A registered worker (one websocket). Times are ``time.monotonic()``."""

    worker_id: str
    agent_name: str
    version: str
    auth_header: str
    registered_at: float
    disconnected_at: float | None = None
    ws: web.WebSocketResponse | None = field(default=None, repr=False)

    @property
    def connected(self) -> bool:
        return self.disconnected_at is None
