"""LiveKit Inference's credential check, shared by its STT, TTS and LLM stand-ins.

The inference clients sign a JWT with the api key/secret; verifying it for real
(rather than accepting any header) is what lets a test prove a client sent the
credentials it was given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from livekit import api

from ._ws import WsProtocol

if TYPE_CHECKING:
    from .server import ProviderServer

__all__ = ["InferenceWsProtocol", "authorized_inference"]


def authorized_inference(verifier: api.TokenVerifier, request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return False
    try:
        verifier.verify(header[len("Bearer ") :])
    except Exception:
        return False
    return True


class InferenceWsProtocol(WsProtocol):
    """A LiveKit Inference websocket: the signed token is checked before the upgrade."""

    @classmethod
    def refuse_unauthorized(cls, server: ProviderServer, request: web.Request) -> web.StreamResponse | None:
        if authorized_inference(server._verifier, request):
            return None
        return web.json_response({"error": "invalid token"}, status=401)
