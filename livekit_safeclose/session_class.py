"""``livekit_safeclose.AgentSession``: the bounded close for the sessions that ask for it.

For code that prefers not to change every session of the process: only instances of this
subclass get the bounded close, with their own bounds. It needs the layer's wrappers of
``AgentActivity`` and the stream ledger, which it applies process-wide on first use; those
are inert for any other session (they act only while a session with options in force
closes). Built on first access, after the compatibility check, so importing the package
never fails on another release.
"""

from __future__ import annotations

from typing import Any

_cls: type[Any] | None = None


def agent_session_class() -> type[Any]:
    """The subclass (built once)."""
    global _cls
    if _cls is None:
        _cls = _build()
    return _cls


def _build() -> type[Any]:
    from livekit.agents.voice.agent_session import AgentSession as Upstream

    from . import compat, patching
    from .options import SESSION_OPTIONS_ATTR, SESSION_PARTS, Options, in_force
    from .patch_table import PATCHES

    compat.check(SESSION_PARTS)

    class AgentSession(Upstream[Any]):
        """Drop-in ``AgentSession`` with the bounded close. Takes the close options of
        :func:`livekit_safeclose.install`: ``drain_timeout``, ``close_timeout``,
        ``graceful_timeout``, ``close_models``."""

        def __init__(
            self,
            *args: Any,
            drain_timeout: float = 5.0,
            close_timeout: float = 10.0,
            graceful_timeout: float | None = 30.0,
            close_models: bool = False,
            **kwargs: Any,
        ) -> None:
            options = Options.validated(
                drain_timeout=drain_timeout,
                close_timeout=close_timeout,
                graceful_timeout=graceful_timeout,
                close_models=close_models,
            )
            patching.apply(PATCHES, SESSION_PARTS, in_force() or options, exclusive=False)
            super().__init__(*args, **kwargs)
            self.__dict__[SESSION_OPTIONS_ATTR] = options

    AgentSession.__module__ = "livekit_safeclose"
    return AgentSession
