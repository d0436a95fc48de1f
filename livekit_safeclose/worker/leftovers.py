"""What a job process still runs when its shutdown sequence ends.

Each job logs one INFO line at the end of its shutdown listing the tasks outside the
process's own machinery, the other threads and the open provider streams, with the
post-close audit of its primary session when that is not clean: what the close did not
stop, and what would keep running under the thread executor.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import streams as streams_mod
from ..audit import audit
from ..report import stuck_task
from ..stacks import module_of, parked_at

logger = logging.getLogger("livekit.agents.safeclose")

#: task modules that are the job process's own machinery (IPC, logging, telemetry, the loop)
_INFRA_MODULES = (
    "asyncio",
    "livekit.agents.ipc",
    "livekit.agents.utils",
    "livekit.agents.telemetry",
    "livekit.agents.cli",
    "livekit.rtc",
    "opentelemetry",
)
_MAX_LISTED = 20


@dataclass
class JobLeftovers:
    """What a job process still runs at the end of its shutdown sequence (session closed,
    ``on_session_end``, ``ShuttingDown``, room disconnect and shutdown callbacks done).

    In the process executor these die with the process a moment later; they are what the close
    did not stop, and what would keep running in the thread executor. ``tasks``: asyncio tasks
    outside the process's own machinery (name, owner module, the line each is parked on);
    ``infra_tasks``: how many of the machinery's tasks are alive (IPC, pings, logging);
    ``threads``: other live threads; ``streams``: provider streams still open (the layer's
    ledger); ``session``: the post-close audit of the job's primary session, if not clean."""

    job_id: str
    reason: str
    tasks: list[dict[str, str]] = field(default_factory=list)
    infra_tasks: int = 0
    threads: list[str] = field(default_factory=list)
    streams: dict[str, int] = field(default_factory=dict)
    session: str = ""

    @property
    def clean(self) -> bool:
        return not self.tasks and not self.streams.get("total", 0) and not self.session

    def summary(self) -> str:
        head = (
            f"job {self.job_id} shutdown done ({self.reason or '-'}): {len(self.tasks)} task(s) still "
            f"running outside the process machinery ({self.infra_tasks} machinery tasks), "
            f"{len(self.threads)} other thread(s), open streams {self.streams or {}}"
        )
        lines = [head]
        lines += [f"  - {t['name']} [{t['module']}] parked at {t['parked_at']}" for t in self.tasks]
        if self.threads:
            lines.append("  threads: " + ", ".join(self.threads))
        if self.session:
            lines.append("  session: " + self.session.replace("\n", "\n    "))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _session_audit(session: Any) -> str:
    try:
        result = audit(session)
    except Exception:
        logger.warning("post-close audit of the job's session failed", exc_info=True)
        return ""
    return "" if result.clean else result.describe()


def job_leftovers(session: Any = None, *, job_id: str = "-", reason: str = "") -> JobLeftovers:
    """Snapshot of what the current process still runs (call it in the job's event loop):
    see :class:`JobLeftovers`. Cheap: one pass over ``asyncio.all_tasks()``."""
    out = JobLeftovers(job_id=job_id, reason=reason)
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        module = module_of(task)
        if module.startswith(_INFRA_MODULES):
            out.infra_tasks += 1
            continue
        if len(out.tasks) < _MAX_LISTED:
            entry = stuck_task(task)
            out.tasks.append({"name": entry.name, "module": module, "parked_at": parked_at(entry.stack)})
    main = threading.main_thread()
    out.threads = sorted(t.name for t in threading.enumerate() if t is not main and t.is_alive())
    if streams_mod.installed():
        counts = streams_mod.open_streams()
        if counts.get("total", 0):
            out.streams = counts
    if session is not None:
        out.session = _session_audit(session)
    return out


def current_job() -> tuple[Any, Any]:
    """The running job's ``JobContext`` and primary ``AgentSession`` (public API: the job's
    context variable), each ``None`` when absent."""
    from livekit.agents.job import get_job_context

    ctx = get_job_context(required=False)
    if ctx is None:
        return None, None
    try:
        session = ctx.primary_session
    except RuntimeError:  # no AgentSession was started for this job
        session = None
    return ctx, session


def log_leftovers(reason: str) -> None:
    """Log :func:`job_leftovers` for the running job as one INFO line (structured in
    ``safeclose_job_leftovers``)."""
    try:
        ctx, session = current_job()
        job_id = str(ctx.job.id) if ctx is not None else "-"
        snap = job_leftovers(session, job_id=job_id, reason=reason)
    except Exception:
        logger.warning("could not list what the job process still runs", exc_info=True)
        return
    logger.info("%s", snap.summary(), extra={"safeclose_job_leftovers": snap.to_dict(), "job_id": job_id})
