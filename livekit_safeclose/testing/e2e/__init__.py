"""End-to-end close scenarios: the REAL provider plugins over real 127.0.0.1 sockets.

Where :mod:`livekit_safeclose.testing.scenarios` injects faults with in-memory fakes,
this package runs a roomless ``AgentSession`` with the real Silero VAD, the real STT
plugin (LiveKit Inference or Deepgram), the real OpenAI LLM plugin and the real Inference
TTS plugin, all talking to a
:class:`~livekit_safeclose.testing.standins.ProviderServer`. What counts is the provider's
view: how many STT connections the *server* still holds after the close returned.

Entry points: :func:`run_e2e_scenario` (one scenario, layer or vanilla, returns an
:class:`E2EOutcome`), :func:`run_fallback_scenario` (a ``FallbackAdapter`` scenario,
returns a :class:`FallbackOutcome`) and :func:`run_churn` (many sessions against a
concurrent-connection quota). The building blocks (:class:`ScriptedAudioInput`, :func:`make_models`,
:func:`make_e2e_session`) are public for tests that need a custom flow.
"""

from __future__ import annotations

from ..scenarios import load_vad
from .agents import E2EAgent, E2EContext
from .audio import ScriptedAudioInput
from .catalogue import E2E_IDS, E2E_SCENARIOS, E2EScenario
from .churn import ChurnOutcome, run_churn
from .fallback import FallbackOutcome, make_stt_fallback, refuse_until_unavailable, run_fallback_scenario
from .models import E2E_CONN_OPTIONS, E2EModels, STTKind, make_e2e_session, make_models
from .outcome import E2EOutcome
from .runner import run_e2e_scenario

__all__ = [
    "E2E_CONN_OPTIONS",
    "E2E_IDS",
    "E2E_SCENARIOS",
    "ChurnOutcome",
    "E2EAgent",
    "E2EContext",
    "E2EModels",
    "E2EOutcome",
    "E2EScenario",
    "FallbackOutcome",
    "STTKind",
    "ScriptedAudioInput",
    "load_vad",
    "make_e2e_session",
    "make_models",
    "make_stt_fallback",
    "refuse_until_unavailable",
    "run_churn",
    "run_e2e_scenario",
    "run_fallback_scenario",
]
