"""livekit-safeclose: LiveKit agent sessions that close bounded and complete.

``install()`` patches livekit-agents so a forced close (``aclose()``,
``shutdown(drain=False)``, close-on-disconnect, error close) gives in-flight speech
``drain_timeout`` to settle, force-cancels what is stuck, always closes the provider
streams, and returns within ``close_timeout``. Graceful drains are unchanged.
"""

from __future__ import annotations

from typing import Any

from ._compat import SUPPORTED_RANGE, IncompatibleLivekitAgents, check
from ._run import Options
from .leftovers import Audit, audit
from .report import CloseReport, StepRecord, StuckTask, last_close_report
from .streams import open_streams

__all__ = [
    "SUPPORTED_RANGE",
    "AgentSession",
    "Audit",
    "CloseReport",
    "IncompatibleLivekitAgents",
    "StepRecord",
    "StuckTask",
    "audit",
    "install",
    "installed_options",
    "is_installed",
    "last_close_report",
    "open_streams",
    "uninstall",
]

__version__ = "0.1.0"

# (owner class, attribute) -> original value, or _ABSENT when the attribute was new
_ABSENT = object()
_saved: dict[tuple[type, str], Any] = {}


def _patches() -> list[tuple[type, str, Any]]:
    from livekit.agents.voice.agent_activity import AgentActivity
    from livekit.agents.voice.agent_session import AgentSession as Upstream

    from . import activity, session

    return [
        (Upstream, "_aclose_impl", session._aclose_impl),
        (Upstream, "_close_soon", session._close_soon),
        (Upstream, "_teardown_activity", session._teardown_activity),
        (AgentActivity, "aclose", activity.aclose),
        (AgentActivity, "_force_cancel_speech_tasks", activity._force_cancel_speech_tasks),
    ]


def install(
    *,
    drain_timeout: float = 5.0,
    close_timeout: float = 10.0,
    close_models: bool = False,
    worker: bool = True,
    signal_guard: bool = True,
    drain_availability: bool = True,
    bounded_drain_end: bool = True,
    reject_late_accepts: bool = True,
) -> None:
    """Patch livekit-agents process-wide. Idempotent: calling it again only changes the
    options. Raises ``ValueError``/``TypeError`` for bad options and
    :class:`IncompatibleLivekitAgents` when the installed release lacks what the patch
    relies on (nothing is patched then).

    ``close_models``: after each close, also close the session's own model instances (not
    ones another running session uses). ``worker`` and the four flags after it harden the
    worker's lifecycle (see README, "Deploying and draining"); each part can be opted out
    of, ``worker=False`` skips them all. They are inert in a process that runs no worker."""
    options = Options.validated(drain_timeout, close_timeout, close_models)
    flags = {
        "signal_guard": signal_guard,
        "drain_availability": drain_availability,
        "bounded_drain_end": bounded_drain_end,
        "reject_late_accepts": reject_late_accepts,
    }
    for name, value in (("worker", worker), *flags.items()):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    from . import session, streams
    from . import worker as worker_mod

    if not _saved:
        check()
    if worker:
        worker_mod.install_worker(close_timeout=options.close_timeout, **flags)
    else:
        worker_mod.uninstall_worker()
    if not _saved:
        for owner, name, value in _patches():
            _saved[(owner, name)] = owner.__dict__.get(name, _ABSENT)
            setattr(owner, name, value)
        streams.install()
    session.set_installed_options(options)


def uninstall() -> None:
    """Restore every original exactly (a no-op when not installed)."""
    from . import session, streams
    from . import worker as worker_mod

    worker_mod.uninstall_worker()
    for (owner, name), original in list(_saved.items()):
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _saved.clear()
    streams.uninstall()
    session.set_installed_options(None)


def is_installed() -> bool:
    return bool(_saved)


def installed_options() -> Options | None:
    """The bounds in force process-wide, ``None`` when not installed."""
    from . import session

    return session._installed_options


def __getattr__(name: str) -> Any:
    # the subclass imports livekit-agents' voice module: load it only when asked for
    if name == "AgentSession":
        from .session import AgentSession

        return AgentSession
    raise AttributeError(name)
