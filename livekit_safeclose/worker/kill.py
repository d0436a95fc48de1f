"""Ending a job process that outlived its bound, the one way both worker parts do it.

The warning comes first (with the pid, for log search) so an operator sees why a process
was killed even if the kill itself fails; a failed kill is logged with its traceback and
never raised: the supervisor must go on closing the other processes.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("livekit.agents.safeclose")


async def kill_job_process(proc: Any, why: str, bound: float) -> None:
    """Kill ``proc`` (a ``SupervisedProc``) after logging ``why``: a format taking the pid
    and ``bound``."""
    pid = getattr(proc, "pid", None)
    logger.warning(why, pid, bound, extra={"pid": pid})
    try:
        await proc.kill()
    except Exception:
        logger.warning("killing job process %s failed", pid, exc_info=True)
