"""The scenario catalogue: every known way a session close hangs, plus healthy controls.

One source of truth for the regression tests, ``livekit-safeclose check`` and the
benchmarks. Each scenario starts a real, roomless ``AgentSession`` (real Silero VAD,
fault-injecting fakes for the models), drives it until the fault is engaged, closes it
along one close path, and measures the outcome.

:mod:`.agents` holds the agents that carry the faults, :mod:`.catalogue`
the scenarios, :mod:`.runner` the run and its measurement.
"""

from __future__ import annotations

from .agents import Ctx, HangingToolset, ScenarioAgent, StuckTask
from .catalogue import CLOSE_PATHS, HANG_CLASSES, SCENARIOS, ClosePath, Scenario, Setup, Trigger, _HangClass
from .runner import TRANSCRIPT_TIMEOUT, Outcome, _close, _closed_event, load_vad, make_session, run_scenario

__all__ = [
    "CLOSE_PATHS",
    "HANG_CLASSES",
    "SCENARIOS",
    "TRANSCRIPT_TIMEOUT",
    "ClosePath",
    "Ctx",
    "HangingToolset",
    "Outcome",
    "Scenario",
    "ScenarioAgent",
    "Setup",
    "StuckTask",
    "Trigger",
    "_HangClass",
    "_close",
    "_closed_event",
    "load_vad",
    "make_session",
    "run_scenario",
]
