"""Version and shape checks of the livekit-agents internals the layer patches.

The layer replaces private methods. A release that renames one of them must make
``install()`` refuse loudly, never turn the patch into a silent no-op.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SUPPORTED_RANGE = ">=1.8.0,<1.9"
_SUPPORTED_MIN = (1, 8, 0)
_SUPPORTED_MAX_EXCLUSIVE = (1, 9, 0)


class IncompatibleLivekitAgents(RuntimeError):
    """The installed livekit-agents does not have the internals the layer patches."""


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.8.9"`` -> ``(1, 8, 9)``; pre-release and local suffixes are ignored."""
    if not isinstance(text, str):
        raise TypeError(f"version must be a str, not {type(text).__name__}")
    head = text.strip().split("+", 1)[0]
    nums: list[int] = []
    for part in head.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            raise ValueError(f"cannot parse livekit-agents version {text!r}")
        nums.append(int(digits))
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def version_supported(text: str) -> bool:
    v = parse_version(text)
    return _SUPPORTED_MIN <= v < _SUPPORTED_MAX_EXCLUSIVE


@dataclass(frozen=True)
class Requirement:
    """One thing a patch relies on: a method (with keyword params) or an attribute that
    the owner's ``__init__`` assigns."""

    owner: str
    name: str
    kind: str  # "method" | "init_attr" | "module_attr"
    params: tuple[str, ...] = ()


def _init_names(cls: type) -> set[str]:
    init = inspect.unwrap(cls.__init__)  # type: ignore[misc]
    code = getattr(init, "__code__", None)
    return set(code.co_names) if code is not None else set()


def _targets() -> dict[str, Any]:
    from livekit.agents import llm, stt, tts
    from livekit.agents.voice import agent as agent_mod
    from livekit.agents.voice import (
        agent_activity,
        agent_session,
        audio_recognition,
        speech_handle,
        tool_executor,
    )

    return {
        "AgentSession": agent_session.AgentSession,
        "AgentActivity": agent_activity.AgentActivity,
        "AgentTask": agent_mod.AgentTask,
        "_ToolExecutor": tool_executor._ToolExecutor,
        "agent_activity": agent_activity,
        "agent": agent_mod,
        "SpeechHandle": speech_handle.SpeechHandle,
        "AudioRecognition": audio_recognition.AudioRecognition,
        "_STTPipeline": audio_recognition._STTPipeline,
        "RecognizeStream": stt.RecognizeStream,
        "SynthesizeStream": tts.SynthesizeStream,
        "ChunkedStream": tts.ChunkedStream,
        "LLMStream": llm.LLMStream,
    }


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("AgentSession", "_aclose_impl", "method", ("reason", "drain", "error")),
    Requirement("AgentSession", "_aclose_locked", "method", ("reason", "drain", "error")),
    Requirement("AgentSession", "_teardown_activity", "method", ("reason", "drain")),
    Requirement("AgentSession", "_close_soon", "method", ("reason", "drain", "error")),
    Requirement("AgentSession", "_cancel_user_away_timer", "method"),
    Requirement("AgentSession", "_on_aec_warmup_expired", "method"),
    Requirement("AgentSession", "shutdown", "method", ("drain",)),
    Requirement("AgentSession", "aclose", "method"),
    *(
        Requirement("AgentSession", n, "init_attr")
        for n in (
            "_closing_task",
            "_closing",
            "_lock",
            "_activity",
            "_started",
            "_tools",
            "_forward_audio_atask",
            "_forward_video_atask",
            "_recorder_io",
            "_ivr_activity",
            "_amd",
            "_agent_speaking_span",
            "_user_speaking_span",
            "_opts",
        )
    ),
    Requirement("AgentActivity", "drain", "method"),
    Requirement("AgentActivity", "aclose", "method"),
    Requirement("AgentActivity", "interrupt", "method", ("force",)),
    Requirement("AgentActivity", "_close_session", "method"),
    Requirement("AgentActivity", "_interrupt_background_speeches", "method", ("force",)),
    Requirement("AgentActivity", "_cancel_preemptive_generation", "method"),
    Requirement("AgentActivity", "_add_drain_blocked_tasks", "method"),
    Requirement("SpeechHandle", "_tasks", "init_attr"),
    Requirement("AudioRecognition", "_commit_user_turn", "method", ("audio_detached", "transcript_timeout")),
    Requirement("AudioRecognition", "_stt_pipeline", "init_attr"),
    Requirement("_STTPipeline", "_recognize_stream", "init_attr"),
    *(
        Requirement("AgentActivity", n, "init_attr")
        for n in (
            "_lock",
            "_speech_tasks",
            "_scheduling_atask",
            "_tool_executor",
            "_on_exit_task",
            "_on_enter_task",
            "_closed",
            "_scheduling_resumed",
            "_mcp_tools",
            "_audio_recognition",
            "_rt_session",
            "_drain_blocked_tasks",
            "_current_speech",
            "_background_speeches",
            "_user_turn_completed_atask",
            "_agent",
            "_session",
        )
    ),
    Requirement("_ToolExecutor", "_running_tasks", "init_attr"),
    Requirement("_ToolExecutor", "_reply_task", "init_attr"),
    Requirement("_ToolExecutor", "_pending_updates", "init_attr"),
    Requirement("AgentTask", "_wait_for_inactive", "method"),
    Requirement("AgentTask", "_old_agent", "init_attr"),
    Requirement("agent_activity", "_AgentActivityContextVar", "module_attr"),
    Requirement("agent_activity", "_get_activity_task_info", "module_attr"),
    Requirement("agent", "_get_activity_task_info", "module_attr"),
    Requirement("RecognizeStream", "_task", "init_attr"),
    Requirement("SynthesizeStream", "_task", "init_attr"),
    Requirement("ChunkedStream", "_synthesize_task", "init_attr"),
    Requirement("LLMStream", "_task", "init_attr"),
)


def missing(
    requirements: Iterable[Requirement] = REQUIREMENTS,
    targets: dict[str, Any] | None = None,
) -> list[str]:
    """Every requirement the given targets do not meet, as readable strings."""
    targets = targets if targets is not None else _targets()
    problems: list[str] = []
    for req in requirements:
        owner = targets.get(req.owner)
        where = f"{req.owner}.{req.name}"
        if owner is None:
            problems.append(f"{req.owner} (not found)")
            continue
        if req.kind == "module_attr":
            if not hasattr(owner, req.name):
                problems.append(where)
        elif req.kind == "init_attr":
            if req.name not in _init_names(owner):
                problems.append(f"{where} (attribute set in __init__)")
        else:
            fn: Callable[..., Any] | None = getattr(owner, req.name, None)
            if not callable(fn):
                problems.append(f"{where}()")
                continue
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                continue
            absent = [p for p in req.params if p not in params]
            if absent:
                problems.append(f"{where}() parameter(s) {', '.join(absent)}")
    return problems


def installed_version() -> str:
    from livekit.agents import __version__

    return str(__version__)


def check(version: str | None = None, targets: dict[str, Any] | None = None) -> None:
    """Raise :class:`IncompatibleLivekitAgents` unless the layer can patch safely."""
    version = installed_version() if version is None else version
    if not version_supported(version):
        raise IncompatibleLivekitAgents(
            f"livekit-safeclose supports livekit-agents {SUPPORTED_RANGE}; "
            f"installed is {version}. Pin livekit-agents or upgrade livekit-safeclose."
        )
    problems = missing(targets=targets)
    if problems:
        raise IncompatibleLivekitAgents(
            f"livekit-agents {version} lacks internals livekit-safeclose patches: "
            + "; ".join(problems)
            + f". Supported range: {SUPPORTED_RANGE}."
        )
