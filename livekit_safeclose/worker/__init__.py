"""Worker lifecycle for livekit-agents 1.8.x: SIGTERM always drains, draining means
unavailable, and the end of a drain is bounded.

``livekit_safeclose.install()`` applies these parts from the patch table (each has its own
flag; ``worker=False`` skips them all): :mod:`.signals` (the signal guard),
:mod:`.availability` (draining means unavailable), :mod:`.drain_end` and
:mod:`.job_shutdown` (the bounded end of a drain, supervisor and job side). They are inert in
a process that runs no worker. :mod:`.idle_report` shows what keeps a worker busy once its
sessions ended; :mod:`.leftovers` what a job process still runs when its shutdown ends.
``python -m livekit_safeclose.worker idle-report --pid PID`` (or ``livekit-safeclose
idle-report``) prints the idle report from outside the worker.

Nothing here imports livekit-agents before a part is applied.
"""

from __future__ import annotations

from .. import patching
from ..options import WORKER_PARTS
from .bounds import FORCED_REASON_PREFIX, proc_close_bound
from .drain_end import forced_end_reason
from .idle_report import IdleReport, ProcInfo, aidle_report, idle_report
from .leftovers import JobLeftovers, job_leftovers
from .signals import drain_requested

__all__ = [
    "FORCED_REASON_PREFIX",
    "IdleReport",
    "JobLeftovers",
    "ProcInfo",
    "aidle_report",
    "drain_requested",
    "forced_end_reason",
    "idle_report",
    "job_leftovers",
    "proc_close_bound",
    "worker_installed",
]


def worker_installed() -> dict[str, bool]:
    """Which worker parts are applied in this process."""
    applied = patching.applied_parts()
    return {part: part in applied for part in WORKER_PARTS}
