"""livekit-safeclose: LiveKit agent sessions that close bounded and complete.

``install()`` patches livekit-agents so a forced close (``aclose()``,
``shutdown(drain=False)``, close-on-disconnect, error close) gives in-flight speech
``drain_timeout`` to settle, force-cancels what is stuck, always closes the provider
streams, and returns within ``close_timeout``. Graceful drains are unchanged. Every patched
target is a row of :mod:`livekit_safeclose.patch_table`.
"""

from __future__ import annotations

from typing import Any

from . import options as _options
from .audit import Audit, audit
from .compat import TESTED_RANGE, IncompatibleLivekitAgents
from .options import Options
from .report import CloseReport, StepRecord, StuckTask, last_close_report
from .streams import open_streams

__all__ = [
    "TESTED_RANGE",
    "AgentSession",
    "Audit",
    "CloseReport",
    "IncompatibleLivekitAgents",
    "Options",
    "StepRecord",
    "StuckTask",
    "audit",
    "install",
    "installed_options",
    "installed_parts",
    "is_installed",
    "last_close_report",
    "open_streams",
    "uninstall",
]

__version__ = "0.1.0"


def install(
    *,
    drain_timeout: float = 5.0,
    close_timeout: float = 10.0,
    graceful_timeout: float | None = 30.0,
    close_models: bool = False,
    worker: bool = True,
    signal_guard: bool = True,
    drain_availability: bool = True,
    bounded_drain_end: bool = True,
    bounded_teardown: bool = True,
    reject_late_accepts: bool = True,
    force_close_on_second_signal: bool = False,
) -> None:
    """Patch livekit-agents process-wide (see README, "Options").

    Idempotent: calling it again only changes the options (and the parts they enable).
    Raises ``TypeError``/``ValueError`` for bad options and :class:`IncompatibleLivekitAgents`
    when the installed release lacks what the close relies on; nothing is patched then. A
    worker part the release cannot support is refused by name in a WARNING, and the rest
    installs."""
    from . import compat, patching
    from .patch_table import PATCHES

    options = Options.validated(
        drain_timeout=drain_timeout,
        close_timeout=close_timeout,
        graceful_timeout=graceful_timeout,
        close_models=close_models,
        worker=worker,
        signal_guard=signal_guard,
        drain_availability=drain_availability,
        bounded_drain_end=bounded_drain_end,
        bounded_teardown=bounded_teardown,
        reject_late_accepts=reject_late_accepts,
        force_close_on_second_signal=force_close_on_second_signal,
    )
    parts = compat.check(options.parts())
    patching.apply(PATCHES, parts, options)
    _options.set_in_force(options)


def uninstall() -> None:
    """Restore every original exactly (a no-op when nothing is patched)."""
    from . import patching

    patching.revert_all()
    _options.set_in_force(None)


def is_installed() -> bool:
    """True while ``install()`` is in force."""
    return _options.in_force() is not None


def installed_options() -> Options | None:
    """Every option in force (``install(**opts.as_dict())`` restores them), ``None`` when
    not installed."""
    return _options.in_force()


def installed_parts() -> set[str]:
    """The parts of the patch table that are applied (``core``, ``stream_ledger`` and the
    worker parts)."""
    from . import patching

    return set(patching.applied_parts())


def __getattr__(name: str) -> Any:
    # the subclass needs livekit-agents and the compatibility check: built when asked for
    if name == "AgentSession":
        from .session_class import agent_session_class

        return agent_session_class()
    raise AttributeError(name)
