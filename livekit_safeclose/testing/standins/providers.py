"""Compatibility re-exports: the stand-ins used to live in this one module.

New code imports from `livekit_safeclose.testing.standins`; this module keeps the
old import path working, including the constants it never listed in `__all__`.
"""

from ._ledger import LogEntry
from ._llm import LLMReply, LLMRequest
from ._types import KINDS, STT_KINDS, InferenceCredentials, Kind, QuotaMode, StallMode
from ._ws import QUOTA_ERROR_CODE as QUOTA_ERROR_CODE
from ._ws import QUOTA_ERROR_MESSAGE as QUOTA_ERROR_MESSAGE
from .deepgram import DEEPGRAM_IDLE_REASON as DEEPGRAM_IDLE_REASON
from .inference_stt import IDLE_CLOSE_CODE, IDLE_CLOSE_MESSAGE
from .server import DEFAULT_API_KEY as DEFAULT_API_KEY
from .server import DEFAULT_API_SECRET as DEFAULT_API_SECRET
from .server import DEFAULT_PROVIDER_KEY as DEFAULT_PROVIDER_KEY
from .server import ProviderServer

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
]
