"""Stand-in provider servers: the real LiveKit plugins, real sockets, fake providers.

See `ProviderServer` for the protocols served, the counters and the fault switches.
"""

from .audio import pcm16_rms, silence_frames, silence_pcm16, tone_frames, tone_pcm16
from .providers import (
    IDLE_CLOSE_CODE,
    IDLE_CLOSE_MESSAGE,
    KINDS,
    STT_KINDS,
    InferenceCredentials,
    Kind,
    LLMReply,
    LLMRequest,
    LogEntry,
    ProviderServer,
    QuotaMode,
    StallMode,
)

__all__ = [
    "IDLE_CLOSE_CODE",
    "IDLE_CLOSE_MESSAGE",
    "KINDS",
    "STT_KINDS",
    "InferenceCredentials",
    "Kind",
    "LLMReply",
    "LLMRequest",
    "LogEntry",
    "ProviderServer",
    "QuotaMode",
    "StallMode",
    "pcm16_rms",
    "silence_frames",
    "silence_pcm16",
    "tone_frames",
    "tone_pcm16",
]
