"""The ``AgentServer`` instances the worker patches have seen in this process.

``JobRequest.accept`` has no reference to its server, and ``aidle_report()`` without an
argument needs the one server of the process: both ask here. Weak references only.
"""

from __future__ import annotations

import weakref
from typing import Any

_seen: weakref.WeakSet[Any] = weakref.WeakSet()


def remember(server: Any) -> None:
    _seen.add(server)


def any_draining() -> bool:
    """True when a seen server drains (``AgentServer.drain()`` called, with or without a signal)."""
    return any(getattr(s, "draining", False) for s in list(_seen))


def the_server(server: Any = None) -> Any:
    """``server`` if given, else the one server seen in this process (``None`` if not exactly one)."""
    if server is not None:
        return server
    seen = list(_seen)
    return seen[0] if len(seen) == 1 else None


def forget_all() -> None:
    _seen.clear()
