"""Stand-in for OpenAI-compatible chat completions (SSE): the "llm" kind.

    POST {openai_url}/chat/completions   livekit.plugins.openai.LLM and inference.LLM
    GET  {openai_url}/models             LLM prewarm

Both clients share the endpoint and tell themselves apart by credentials: the
provider key as a bearer token (openai plugin) or a signed inference JWT. Replies
come from `ProviderServer.llm_script`; a stream counts as a clean close once
`[DONE]` has been written, since that is the only goodbye HTTP streaming has.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict

import aiohttp
from aiohttp import web

from ._inference_auth import authorized_inference
from ._ledger import Conn
from ._llm import LLMReply, LLMRequest, completion_body, reply_chunks
from ._types import Route

if TYPE_CHECKING:
    from .server import ProviderServer

__all__ = ["ROUTES"]

LLMClient = Literal["inference", "openai"]


async def handle_models(server: ProviderServer, request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": "standin", "object": "model", "created": 0, "owned_by": "standin"}],
        }
    )


def _client_of(server: ProviderServer, request: web.Request) -> LLMClient | None:
    """Which client sent the request, by its credentials; None when they are invalid."""
    if request.headers.get("Authorization", "") == f"Bearer {server.provider_api_key}":
        return "openai"
    if authorized_inference(server._verifier, request):
        return "inference"
    return None


def _parse_request(body: Any, client: LLMClient) -> LLMRequest:
    messages = list(body.get("messages") or [])
    tools = [
        str(t.get("function", {}).get("name", "")) for t in (body.get("tools") or []) if isinstance(t, dict)
    ]
    model = str(body.get("model", "standin"))
    return LLMRequest(messages=messages, tools=tools, model=model, client=client, body=body)


class _CompletionIds(TypedDict):
    """The identifiers every chunk (or the one body) of a completion repeats."""

    completion_id: str
    model: str
    created: int
    call_prefix: str


async def handle_chat(server: ProviderServer, request: web.Request) -> web.StreamResponse:
    """One completion: auth -> stall -> record the request -> scripted reply."""
    with server._ledger.track("llm", request) as conn:
        client = _client_of(server, request)
        if client is None:
            conn.log("unauthorized")
            return web.json_response(
                {"error": {"message": "invalid api key", "type": "auth", "code": "401"}}, status=401
            )
        conn.ledger.mark_open(conn)
        stall = server._stall_for(conn.kind)
        if stall == "no_handshake":
            conn.log("stall:no_handshake")
            await server._hold(request)
            return web.Response(status=503, text="stalled")
        body = await request.json()
        llm_request = _parse_request(body, client)
        server._record_llm_request(llm_request)
        conn.log("chat", client)
        ids = _CompletionIds(
            completion_id=f"chatcmpl-standin-{conn.id}",
            model=llm_request.model,
            created=int(time.time()),
            call_prefix=f"call_standin_{conn.id}",
        )
        if stall == "never_answer":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            conn.log("stall:never_answer")
            await server._hold(request)
            return resp
        reply = server._next_reply()
        if server.llm_first_token_delay > 0:
            await asyncio.sleep(server.llm_first_token_delay)
        return await _answer(conn, request, reply, ids, stream=bool(body.get("stream")))


async def _answer(
    conn: Conn, request: web.Request, reply: LLMReply, ids: _CompletionIds, *, stream: bool
) -> web.StreamResponse:
    """Write `reply` as one JSON body or as SSE chunks, as the request asked."""
    if not stream:
        conn.clean = True
        return web.json_response(completion_body(reply, **ids))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        for chunk in reply_chunks(reply, **ids):
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        conn.log("client_gone")
        return resp
    conn.clean = True
    return resp


ROUTES: Final = (
    Route("POST", "/v1/chat/completions", handle_chat),
    Route("GET", "/v1/models", handle_models),
)
