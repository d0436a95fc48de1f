"""The end-to-end scenario catalogue: each names a fault the real plugins meet over real
sockets, and the STT plugins it runs with; ``E2E_IDS`` (what ``check --e2e`` runs) is
derived from it so a new scenario cannot be left out of the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..mcp import HANG_TOOL, MCPTransport
from ..standins import Kind, LLMReply, StallMode
from .agents import ExitMode, ToolMode
from .models import STTKind

Trigger = Literal["voice", "text", "none"]
Path = Literal["aclose", "shutdown", "disconnect"]
#: a ``FallbackAdapter`` case (run by :func:`~.fallback.run_fallback_scenario`)
FallbackCase = Literal["stt_recovery", "tts_probe_on_close", "tts_probe_in_flight"]


@dataclass(frozen=True)
class E2EScenario:
    """One end-to-end close scenario.

    ``stall`` (kind, when): the stand-in stalls that kind ``never_answer``, set
    ``"before_start"`` (the pooled TTS socket prewarmed at start stalls too) or
    ``"before_trigger"``. ``engaged``: what must have happened before the close starts
    (``"tool"``: the tool was entered; ``"llm_open"``: the LLM request is held open;
    ``"llm_done"``: the LLM answered in full, so the reply text is in the TTS stream).
    ``vanilla_hangs``: whether unpatched livekit-agents is expected to hang on it.
    ``stt_kinds``: the STT plugins ``livekit-safeclose check --e2e`` runs it with (for
    ``fallback="stt_recovery"``: the one refused once, the other serving).
    ``realtime``: the LLM is the OpenAI Realtime model (``script`` then scripts its
    responses); ``stall_mode``: how the stalled kind stalls; ``item_delay``: the Realtime
    stand-in holds its confirmation of a tool result this long; ``path``: how the session is
    closed (``"shutdown"``: ``shutdown(drain=False)``; ``"disconnect"``: the caller hangs up,
    audio stops, close-on-disconnect). ``fallback``: a ``FallbackAdapter`` scenario, whose
    verdict is the failed provider's connections a second after the close (see
    :mod:`.fallback`). ``mcp``: the agent (``mcp_scope="agent"``) or the session carries an
    ``MCPToolset`` on a real MCP stand-in of that transport; ``mcp_stubborn``: its shutdown
    is ignored; ``engaged="mcp_call"``: the MCP server
    received the tool call."""

    id: str
    stuck: str
    description: str
    tool: ToolMode = "ok"
    on_exit: ExitMode = "none"
    script: tuple[LLMReply, ...] = ()
    trigger: Trigger = "none"
    engaged: Literal["start", "tool", "llm_open", "llm_done", "realtime_open", "mcp_call"] = "start"
    stall: tuple[Kind, Literal["before_start", "before_trigger"]] | None = None
    vanilla_hangs: bool = True
    stt_kinds: tuple[STTKind, ...] = ("inference_stt",)
    realtime: bool = False
    stall_mode: StallMode = "never_answer"
    item_delay: float = 0.0
    path: Path = "aclose"
    fallback: FallbackCase | None = None
    mcp: MCPTransport | None = None
    mcp_stubborn: bool = False
    mcp_scope: Literal["agent", "session"] = "agent"


_TOOL_CALL = (LLMReply(tool_calls=[("lookup", {})]),)
_LONG_TEXT = (LLMReply(text="Here is a long answer that takes a while to say out loud."),)
_MCP_CALL = (LLMReply(tool_calls=[(HANG_TOOL, {})]),)


def _mcp_hang(t: MCPTransport, suffix: str, stuck: str, description: str, **kw: Any) -> E2EScenario:
    return E2EScenario(
        f"mcp-{t}-hang{suffix}", f"{t} MCP tool call never answers{stuck}", description,
        script=_MCP_CALL, trigger="text", engaged="mcp_call", mcp=t, **kw,
    )  # fmt: skip


def _mcp_scenarios() -> list[E2EScenario]:
    """Real MCP servers (livekit/agents#5212): per transport, a tool call that never answers
    closed by ``aclose()`` and by ``shutdown(drain=False)`` (and with the toolset on the
    session), and a healthy session whose server ignores its shutdown."""
    out: list[E2EScenario] = []
    transports: tuple[MCPTransport, ...] = ("stdio", "http")
    for t in transports:
        out += [
            _mcp_hang(t, "", " (aclose)",
                      "The LLM calls an MCP tool whose server never answers; the toolset's own "
                      "executor holds the call, and MCPToolset.aclose() drains it first."),
            _mcp_hang(t, "-shutdown", " (shutdown)", "As above, closed by shutdown(drain=False).",
                      path="shutdown"),
            _mcp_hang(t, "-session", ", session toolset",
                      "As above, with the MCPToolset on the session (closed after the activity).",
                      mcp_scope="session"),
            E2EScenario(f"mcp-{t}-stubborn", f"{t} MCP server ignores its shutdown (healthy close)",
                        "Nothing is stuck; the server ignores its shutdown (stdio: stdin EOF and "
                        "SIGTERM; HTTP: the session DELETE is never answered).", mcp=t, mcp_stubborn=True),
        ]  # fmt: skip
    return out


E2E_SCENARIOS: dict[str, E2EScenario] = {
    s.id: s
    for s in [
        E2EScenario(
            "tool-stuck",
            "tool parked forever, reached through a real LLM tool call",
            "The caller speaks (tone -> real STT transcript -> end of turn), the real LLM "
            "plugin receives a scripted tool call, and the tool never returns.",
            tool="park",
            script=_TOOL_CALL,
            trigger="voice",
            engaged="tool",
            # each STT plugin says goodbye its own way (session.close / CloseStream)
            stt_kinds=("inference_stt", "deepgram_stt"),
        ),
        E2EScenario(
            "on-exit-hang",
            "Agent.on_exit never returns",
            "on_exit runs inside the close (drain holds the activity lock while awaiting it).",
            on_exit="park",
        ),
        E2EScenario(
            "tts-stall-goodbye",
            "TTS provider never answers a goodbye said in on_exit",
            "A realistic outage: on_exit says goodbye, the TTS stand-in accepts the socket and "
            "never answers. Vanilla waits for the TTS conn_options (timeout x attempts).",
            on_exit="say",
            stall=("inference_tts", "before_start"),
        ),
        E2EScenario(
            "llm-stall-goodbye",
            "LLM provider never answers a goodbye generated in on_exit",
            "on_exit asks the LLM for a goodbye; the LLM stand-in sends headers and nothing else.",
            on_exit="reply",
            stall=("llm", "before_trigger"),
        ),
        # realtime models: the real openai.realtime.RealtimeModel against the Realtime stand-in
        E2EScenario(
            "realtime-tool-stuck",
            "tool parked forever during a realtime turn",
            "A text turn on the Realtime model: the stand-in answers with a function call and "
            "the tool never returns; vanilla's drain waits for it forever.",
            tool="park",
            script=_TOOL_CALL,
            trigger="text",
            engaged="tool",
            realtime=True,
        ),
        E2EScenario(
            "realtime-tool-unanswered",
            "cancelled tool's result pushed to a closing realtime session",
            "The tool's cancellation unwinds past the drain phase; the speech task, whose "
            "cancel the tool runner absorbed, then pushes the tool result to the realtime "
            "session, whose confirmation the stand-in holds until after the close: the client "
            "never delivers it and update_chat_ctx waits 5 s.",
            tool="linger",
            script=_TOOL_CALL,
            trigger="text",
            engaged="tool",
            realtime=True,
            item_delay=3.0,
        ),
        E2EScenario(
            "realtime-no-handshake",
            "realtime server never finishes the websocket upgrade",
            "The Realtime stand-in holds the upgrade request; aclose() of the realtime session "
            "waits for its main task, parked in ws_connect for the whole connect timeout.",
            engaged="realtime_open",
            realtime=True,
            stall=("openai_realtime", "before_start"),
            stall_mode="no_handshake",
        ),
        E2EScenario(
            "realtime-disconnect",
            "caller hangs up during a realtime turn whose tool is stuck",
            "Close-on-disconnect (the caller's audio stops) while the tool of a realtime turn "
            "is parked: vanilla's drain waits for the tool forever.",
            tool="park",
            script=_TOOL_CALL,
            trigger="text",
            engaged="tool",
            realtime=True,
            path="disconnect",
        ),
        # control: the client drops the socket itself when the close goes unanswered
        E2EScenario(
            "realtime-no-close-ack",
            "realtime server never answers the close (control)",
            "The Realtime stand-in serves, then never acknowledges the client's close frame: "
            "the client's receive loop ends the close and drops the socket, vanilla included.",
            realtime=True,
            engaged="realtime_open",
            stall=("openai_realtime", "before_start"),
            stall_mode="no_close_ack",
            vanilla_hangs=False,
        ),
        # controls: a stall *while a reply is generating* does not hang vanilla, because
        # the forced interrupt cancels the reply and the plugins' streams end on cancel
        E2EScenario(
            "llm-stall-reply",
            "LLM never answers while a reply is generating (control)",
            "The forced interrupt reaches the stalled LLM stream: both close promptly.",
            script=_LONG_TEXT,
            trigger="text",
            engaged="llm_open",
            stall=("llm", "before_trigger"),
            vanilla_hangs=False,
        ),
        E2EScenario(
            "tts-stall-reply",
            "TTS never answers while a reply is generating (control)",
            "The forced interrupt reaches the stalled TTS stream: both close promptly.",
            script=_LONG_TEXT,
            trigger="text",
            engaged="llm_done",
            stall=("inference_tts", "before_start"),
            vanilla_hangs=False,
        ),
        # FallbackAdapter recovery: vanilla closes promptly and leaves the recovery running
        E2EScenario(
            "stt-fallback-recovery",
            "FallbackAdapter recovery stream to the STT provider that was refused once",
            "The primary STT is refused once, then back; its recovery stream (fed the caller's "
            "silence, waiting for a final transcript) is open when the session closes. Only "
            "FallbackAdapter.aclose() cancels it; the Deepgram plugin keeps it alive.",
            vanilla_hangs=False,
            stt_kinds=("deepgram_stt", "inference_stt"),
            fallback="stt_recovery",
        ),
        E2EScenario(
            "tts-fallback-probe-on-close",
            "FallbackAdapter TTS probe started by the close itself",
            "The primary TTS was refused during the first reply, then back; the second reply is "
            "streaming when the session closes, and the stream's finally starts a probe: a new "
            "request to the provider after the close, its socket pooled.",
            vanilla_hangs=False,
            fallback="tts_probe_on_close",
        ),
        E2EScenario(
            "tts-fallback-probe-in-flight",
            "FallbackAdapter TTS probe still connecting to a hung provider",
            "The primary TTS was refused, then hangs; the first reply's probe is still connecting "
            "when the session closes, and keeps connecting until its timeout.",
            vanilla_hangs=False,
            fallback="tts_probe_in_flight",
        ),
        *_mcp_scenarios(),
    ]
}

#: ``{id}@{stt_kind}`` for every scenario and every STT kind it runs with
E2E_IDS: tuple[str, ...] = tuple(f"{s.id}@{kind}" for s in E2E_SCENARIOS.values() for kind in s.stt_kinds)
