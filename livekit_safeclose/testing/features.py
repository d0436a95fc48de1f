"""What the installed livekit-agents release offers the test support, read from its shapes.

The fakes and scenarios are built on public classes whose API grew over releases. A
scenario whose feature the installed release lacks names it in ``Scenario.requires`` and is
reported "n/a" with the reason below, never skipped silently; where only a keyword differs,
the test support adapts (:func:`transcript_kwargs`). Like :mod:`livekit_safeclose.adapters`,
nothing here reads a version string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..adapters import FIXED_TRANSCRIPT_WAIT


def _toolset_lifecycle() -> bool:
    from livekit.agents import llm

    return callable(getattr(llm.Toolset, "setup", None)) and callable(getattr(llm.Toolset, "aclose", None))


def _transcript_option() -> bool:
    from livekit.agents.voice.agent_session import AgentSessionOptions

    return "session_close_transcript_timeout" in getattr(AgentSessionOptions, "__dataclass_fields__", {})


def _end_call_tool() -> bool:
    import importlib.util

    try:
        return all(
            importlib.util.find_spec(m) is not None
            for m in ("livekit.agents.beta.tools.end_call", "livekit.agents.testing")
        )
    except ImportError:  # a parent package is missing
        return False


#: feature -> (is it there?, why a scenario needing it is n/a)
FEATURES: dict[str, tuple[Callable[[], bool], str]] = {
    "toolset_lifecycle": (
        _toolset_lifecycle,
        "llm.Toolset has no setup()/aclose() on this release: nothing sets up or closes a toolset "
        "(MCP servers go through mcp_servers=)",
    ),
    "end_call_tool": (
        _end_call_tool,
        "no livekit.agents.beta.tools.EndCallTool (or no livekit.agents.testing.fake_job_context) "
        "on this release",
    ),
}


def lacking(requires: Iterable[str]) -> str | None:
    """Why a scenario needing ``requires`` cannot run here, ``None`` when it can."""
    reasons = [FEATURES[name][1] for name in requires if not FEATURES[name][0]()]
    return "; ".join(reasons) if reasons else None


def transcript_kwargs(timeout: float) -> dict[str, Any]:
    """The ``AgentSession`` keyword that sets the close's final-transcript wait; none where
    the release has no such option (its close waits a fixed time)."""
    return {"session_close_transcript_timeout": timeout} if _transcript_option() else {}


def close_transcript_wait(timeout: float) -> float:
    """How long a close on this release waits for the final transcript when sessions are
    made with :func:`transcript_kwargs` (``timeout``)."""
    return timeout if _transcript_option() else FIXED_TRANSCRIPT_WAIT
