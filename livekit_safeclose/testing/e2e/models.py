"""The real provider plugins of one end-to-end session, pointed at one stand-in server,
and the roomless session built on them.

Short connect options and a short final-transcript wait keep a stalled stand-in from
turning every run into the upstream defaults' tens of seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from livekit.agents import AgentSession, APIConnectOptions, inference, llm, stt, tts
from livekit.agents.voice.agent_session import SessionConnectOptions

from ..fakes import FastAudioOutput
from ..scenarios import load_vad
from ..standins import ProviderServer
from .audio import ScriptedAudioInput

STTKind = Literal["inference_stt", "deepgram_stt"]

#: short timeouts so a stalled stand-in fails an attempt in seconds, not the default 10 s
E2E_CONN_OPTIONS = APIConnectOptions(timeout=2.0, max_retry=1, retry_interval=0.1)

#: the final-transcript wait of the e2e sessions (upstream default 2 s)
TRANSCRIPT_TIMEOUT = 0.3


@dataclass
class E2EModels:
    """The real plugins of one session, pointed at one stand-in server. ``aclose()``
    closes them (the TTS pool, the LLM client, the shared aiohttp session), bounded."""

    stt: stt.STT[Any]
    llm: llm.LLM[Any] | llm.RealtimeModel
    tts: tts.TTS[Any]
    http: aiohttp.ClientSession
    stt_kind: STTKind

    async def aclose(self, timeout: float = 1.0) -> None:
        closers = [asyncio.ensure_future(m.aclose()) for m in (self.tts, self.llm, self.stt)]
        await asyncio.wait(closers, timeout=timeout)
        for c in closers:
            c.cancel()
            if c.done() and not c.cancelled():
                c.exception()  # retrieved: a failing close must not warn at GC
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.http.close(), timeout)


def make_models(
    server: ProviderServer, stt_kind: STTKind = "inference_stt", *, realtime: bool = False
) -> E2EModels:
    """Real STT (Inference or Deepgram), OpenAI LLM (``realtime``: the OpenAI Realtime model,
    with ``E2E_CONN_OPTIONS``) and Inference TTS against ``server``, sharing one fresh
    aiohttp session (no job context needed). Call inside a running loop."""
    http = aiohttp.ClientSession()
    creds = server.inference_credentials()
    model_stt: stt.STT[Any]
    if stt_kind == "inference_stt":
        model_stt = inference.STT(
            model="deepgram/nova-3", base_url=server.inference_url, http_session=http, **creds
        )
    else:
        from livekit.plugins import deepgram

        model_stt = deepgram.STT(
            base_url=server.deepgram_url, api_key=server.provider_api_key, http_session=http
        )
    from livekit.plugins import openai

    if realtime:
        _prewarm_realtime_types()
    model_llm: llm.LLM[Any] | llm.RealtimeModel = (
        openai.realtime.RealtimeModel(
            base_url=server.openai_url,
            api_key=server.provider_api_key,
            http_session=http,
            conn_options=E2E_CONN_OPTIONS,
        )
        if realtime
        else openai.LLM(model="gpt-4o-mini", base_url=server.openai_url, api_key=server.provider_api_key)
    )
    return E2EModels(
        stt=model_stt,
        llm=model_llm,
        tts=inference.TTS(
            model="cartesia/sonic-3", base_url=server.inference_url, http_session=http, **creds
        ),
        http=http,
        stt_kind=stt_kind,
    )


def _prewarm_realtime_types() -> None:
    """Build the Realtime client's lazily built pydantic models once per process. The
    first tool result pushed to a realtime session otherwise builds them inside the event
    loop (0.8-1.3 s of CPU on a loaded 2-core box), in the middle of the close under test."""
    from livekit.agents import llm as lk_llm
    from livekit.plugins.openai.realtime.utils import livekit_item_to_openai_item

    for item in (
        lk_llm.ChatMessage(role="user", content=["hi"]),
        lk_llm.ChatMessage(role="assistant", content=["hi"]),
        lk_llm.FunctionCall(call_id="c", name="f", arguments="{}"),
        lk_llm.FunctionCallOutput(call_id="c", name="f", output="x", is_error=False),
    ):
        livekit_item_to_openai_item(item)


def make_e2e_session(
    models: E2EModels,
    *,
    session_cls: type[AgentSession[Any]] = AgentSession,
    conn_options: APIConnectOptions = E2E_CONN_OPTIONS,
    stt_conn_options: APIConnectOptions | None = None,
    transcript_timeout: float = TRANSCRIPT_TIMEOUT,
    audio: ScriptedAudioInput | None = None,
    **kwargs: Any,
) -> tuple[AgentSession[Any], ScriptedAudioInput]:
    """A roomless session on the real plugins and the real Silero VAD, with a scripted
    audio input and an audio output that plays instantly."""
    session: AgentSession[Any] = session_cls(
        stt=models.stt,
        llm=models.llm,
        tts=models.tts,
        vad=load_vad(),
        session_close_transcript_timeout=transcript_timeout,
        conn_options=SessionConnectOptions(
            stt_conn_options=stt_conn_options or conn_options,
            llm_conn_options=conn_options,
            tts_conn_options=conn_options,
        ),
        **kwargs,
    )
    audio = audio if audio is not None else ScriptedAudioInput()
    session.input.audio = audio
    session.output.audio = FastAudioOutput()
    return session, audio
