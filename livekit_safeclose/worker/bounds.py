"""The bounds of a forced end of drain, in one place.

A job process whose shutdown was forced gets the session close (``close_timeout``), the
job-side guard margin around it, a grace for ``on_session_end`` and ``ShuttingDown``, and
the exit; the supervisor kills it past that (:func:`proc_close_bound`). Every reader looks
these up here at call time.
"""

from __future__ import annotations

from ..options import Options, in_force

#: the ``ShutdownRequest`` reason (prefix) a job process reads as "force-close the session now"
FORCED_REASON_PREFIX = "safeclose: forced close"
#: upstream's job-side guard around ``session.aclose()`` (60 s) becomes close_timeout + this
SESSION_GUARD_MARGIN = 1.0
#: what a forced job gets after its session closed, for ``on_session_end`` and ``ShuttingDown``
FORCED_END_GRACE = 2.0
#: IPC and the process exit after that
PROC_EXIT_SLACK = 1.0
#: after a second signal (``force_close_on_second_signal``), the worker exits at the latest
#: this long after the processes' bound
WATCHDOG_SLACK = 2.0
#: how long a cancelled entrypoint gets to unwind in a forced job shutdown
ENTRYPOINT_UNWIND = 0.5


def proc_close_bound(close_timeout: float) -> float:
    """How long a job process may take to end once its forced shutdown began, before the
    supervisor kills it: the session close bound plus the job-side guard margin, the grace for
    ``on_session_end`` / ``ShuttingDown``, and the exit."""
    return close_timeout + SESSION_GUARD_MARGIN + FORCED_END_GRACE + PROC_EXIT_SLACK


#: after a job process said ``ShuttingDown``: IPC, pending tasks, the job's cleanup, the exit
TEARDOWN_SLACK = 2.0


def teardown_bound(close_timeout: float) -> float:
    """How long a job process may run once it said ``ShuttingDown`` (its room disconnect and
    its shutdown callbacks, each bounded by ``close_timeout``, then cleanup and exit) before the
    supervisor kills it."""
    return 2 * close_timeout + TEARDOWN_SLACK


def close_timeout() -> float:
    """The close bound in force (the default while the layer is not installed)."""
    opts = in_force()
    return (opts or Options()).close_timeout
