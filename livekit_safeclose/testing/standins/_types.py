"""Names shared by the server and the protocol modules.

They live apart from `server.py` so a protocol module can name them at runtime
while importing `ProviderServer` for type checking only (no import cycle).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, TypedDict

from aiohttp import web

if TYPE_CHECKING:
    from .server import ProviderServer

__all__ = [
    "KINDS",
    "STT_KINDS",
    "Handler",
    "InferenceCredentials",
    "Kind",
    "QuotaMode",
    "Route",
    "StallMode",
]

Kind = Literal["inference_stt", "inference_tts", "deepgram_stt", "llm", "openai_realtime"]
StallMode = Literal["never_answer", "no_handshake", "no_close_ack"]
QuotaMode = Literal["http429", "error_frame"]

KINDS: Final[tuple[Kind, ...]] = ("inference_stt", "inference_tts", "deepgram_stt", "llm", "openai_realtime")
STT_KINDS: Final[frozenset[Kind]] = frozenset({"inference_stt", "deepgram_stt"})


class InferenceCredentials(TypedDict):
    """`**srv.inference_credentials()` for the inference clients (typed for mypy)."""

    api_key: str
    api_secret: str


Handler = Callable[["ProviderServer", web.Request], Awaitable[web.StreamResponse]]


class Route(NamedTuple):
    """One endpoint a protocol module serves; `server.ROUTES` lists them all."""

    method: Literal["GET", "POST"]
    path: str
    handler: Handler
