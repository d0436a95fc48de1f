"""OpenAI chat-completions wire format for the LLM stand-in.

Chunk shapes follow what `livekit.agents.inference.llm.LLMStream._parse_choice`
accumulates (the openai plugin's LLMStream subclasses it): a tool call opens with a
delta carrying `index`, `id` and `function.name`, later deltas for the same index
append `function.arguments`, and `finish_reason == "tool_calls"` closes the last one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["LLMReply", "LLMRequest", "completion_body", "reply_chunks"]


@dataclass(frozen=True)
class LLMReply:
    """One scripted assistant turn: optional text, then optional tool calls (name, arguments)."""

    text: str = ""
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class LLMRequest:
    """What a chat-completions request carried, so tests can assert on tool results sent back."""

    messages: list[dict[str, Any]]
    tools: list[str]
    model: str
    client: Literal["inference", "openai"]
    body: dict[str, Any]

    def tool_outputs(self) -> list[dict[str, Any]]:
        """The `role == "tool"` messages (function results) in this request."""
        return [m for m in self.messages if m.get("role") == "tool"]


def _chunk(
    completion_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _text_pieces(text: str) -> list[str]:
    """Word-sized pieces that concatenate back to `text` exactly."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        current += ch
        if ch == " ":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def reply_chunks(
    reply: LLMReply, *, completion_id: str, model: str, created: int, call_prefix: str
) -> list[dict[str, Any]]:
    """The streamed chunks for `reply`, ending with a usage-only chunk (include_usage)."""
    chunks: list[dict[str, Any]] = []
    first = True

    def role() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"role": "assistant"}
        return {}

    for piece in _text_pieces(reply.text):
        chunks.append(_chunk(completion_id, model, created, {**role(), "content": piece}, None))
    for index, (name, arguments) in enumerate(reply.tool_calls):
        raw = json.dumps(arguments)
        half = len(raw) // 2
        opening = {
            "index": index,
            "id": f"{call_prefix}_{index}",
            "type": "function",
            "function": {"name": name, "arguments": raw[:half]},
        }
        chunks.append(_chunk(completion_id, model, created, {**role(), "tool_calls": [opening]}, None))
        rest = {"index": index, "function": {"arguments": raw[half:]}}
        chunks.append(_chunk(completion_id, model, created, {"tool_calls": [rest]}, None))
    if first:  # neither text nor tools: still announce the role once
        chunks.append(_chunk(completion_id, model, created, {"role": "assistant", "content": ""}, None))
    finish = "tool_calls" if reply.tool_calls else "stop"
    chunks.append(_chunk(completion_id, model, created, {}, finish))
    completion_tokens = max(1, len(reply.text.split()) + 8 * len(reply.tool_calls))
    chunks.append(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": completion_tokens,
                "total_tokens": 10 + completion_tokens,
            },
        }
    )
    return chunks


def completion_body(
    reply: LLMReply, *, completion_id: str, model: str, created: int, call_prefix: str
) -> dict[str, Any]:
    """Non-streaming equivalent of `reply_chunks` (for clients that set stream=false)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": f"{call_prefix}_{i}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            for i, (name, args) in enumerate(reply.tool_calls)
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }
