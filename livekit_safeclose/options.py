"""The layer's options: validated once, and the ones in force.

``install()`` takes every option as a keyword; :meth:`Options.validated` checks them all
before anything is patched, so a bad value never leaves a half-installed layer. The
options in force live here and nowhere else: the close path reads them (per session, the
``AgentSession`` subclass's own options win), ``installed_options()`` returns them whole.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

#: the parts of the patch table an install can enable
Part = Literal[
    "core",
    "stream_ledger",
    "signal_guard",
    "drain_availability",
    "bounded_drain_end",
    "bounded_teardown",
    "force_close_on_second_signal",
]
WORKER_PARTS: tuple[Part, ...] = (
    "signal_guard",
    "drain_availability",
    "bounded_drain_end",
    "bounded_teardown",
    "force_close_on_second_signal",
)
SESSION_PARTS: tuple[Part, ...] = ("core", "stream_ledger")


def seconds(name: str, value: object) -> float:
    """A finite, positive number of seconds (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return out


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Options:
    """Every option of :func:`livekit_safeclose.install`.

    ``drain_timeout``/``close_timeout`` bound a forced close; ``graceful_timeout`` bounds
    the wait of a graceful one (``None``: upstream's unbounded wait), after which it is
    forced; ``close_models`` also closes the session's own model instances; ``worker`` and
    the flags after it choose the worker lifecycle parts (``worker=False`` turns them all
    off)."""

    drain_timeout: float = 5.0
    close_timeout: float = 10.0
    graceful_timeout: float | None = 30.0
    close_models: bool = False
    worker: bool = True
    signal_guard: bool = True
    drain_availability: bool = True
    bounded_drain_end: bool = True
    bounded_teardown: bool = True
    reject_late_accepts: bool = True
    force_close_on_second_signal: bool = False

    @classmethod
    def validated(cls, **values: Any) -> Options:
        """Check every value (``TypeError``/``ValueError``) and return the options."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}")
        merged = {**dataclasses.asdict(cls()), **values}
        checked: dict[str, Any] = {}
        for name, value in merged.items():
            if name == "graceful_timeout" and value is None:
                checked[name] = None
            elif name.endswith("_timeout"):
                checked[name] = seconds(name, value)
            else:
                checked[name] = flag(name, value)
        if checked["drain_timeout"] > checked["close_timeout"]:
            raise ValueError(
                f"drain_timeout ({checked['drain_timeout']}) must be <= close_timeout "
                f"({checked['close_timeout']})"
            )
        return cls(**checked)

    def as_dict(self) -> dict[str, Any]:
        """Keyword arguments that ``install(**...)`` turns back into these options."""
        return dataclasses.asdict(self)

    def parts(self) -> tuple[Part, ...]:
        """The patch-table parts these options enable, in install order."""
        # the second-signal close is a mode of the bounded end: never without it
        worker = [
            p
            for p in WORKER_PARTS
            if self.worker
            and getattr(self, p)
            and (p != "force_close_on_second_signal" or self.bounded_drain_end)
        ]
        return (*SESSION_PARTS, *worker)


_in_force: Options | None = None


def in_force() -> Options | None:
    """The process-wide options, ``None`` while the layer is not installed."""
    return _in_force


def set_in_force(options: Options | None) -> None:
    global _in_force
    _in_force = options


#: where the ``AgentSession`` subclass keeps its own options on the instance
SESSION_OPTIONS_ATTR = "_safeclose_options"


def for_session(session: Any) -> Options | None:
    """The options a close of ``session`` runs with: its own (the subclass), else the
    process-wide ones, else ``None`` (upstream's close, unchanged)."""
    own: Options | None = session.__dict__.get(SESSION_OPTIONS_ATTR)
    return own if own is not None else _in_force
