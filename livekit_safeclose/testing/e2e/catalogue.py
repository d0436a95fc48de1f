"""The end-to-end scenario catalogue: each names a fault the real plugins meet over real
sockets, and the STT plugins it runs with; ``E2E_IDS`` (what ``check --e2e`` runs) is
derived from it so a new scenario cannot be left out of the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..standins import Kind, LLMReply, StallMode
from .agents import ExitMode, ToolMode
from .models import STTKind

Trigger = Literal["voice", "text", "none"]
#: how the session is closed: ``aclose()``, or what room io does when the caller hangs up
Path = Literal["aclose", "disconnect"]


@dataclass(frozen=True)
class E2EScenario:
    """One end-to-end close scenario.

    ``stall`` (kind, when): the stand-in stalls that kind ``never_answer``, set
    ``"before_start"`` (the pooled TTS socket prewarmed at start stalls too) or
    ``"before_trigger"``. ``engaged``: what must have happened before the close starts
    (``"tool"``: the tool was entered; ``"llm_open"``: the LLM request is held open;
    ``"llm_done"``: the LLM answered in full, so the reply text is in the TTS stream).
    ``vanilla_hangs``: whether unpatched livekit-agents is expected to hang on it.
    ``stt_kinds``: the STT plugins ``livekit-safeclose check --e2e`` runs it with.
    ``realtime``: the LLM is the OpenAI Realtime model (``script`` then scripts its
    responses); ``stall_mode``: how the stalled kind stalls; ``item_delay``: the Realtime
    stand-in holds its confirmation of a tool result this long; ``path``: how the session is
    closed (``"disconnect"``: the caller hangs up, audio stops, close-on-disconnect)."""

    id: str
    stuck: str
    description: str
    tool: ToolMode = "ok"
    on_exit: ExitMode = "none"
    script: tuple[LLMReply, ...] = ()
    trigger: Trigger = "none"
    engaged: Literal["start", "tool", "llm_open", "llm_done", "realtime_open"] = "start"
    stall: tuple[Kind, Literal["before_start", "before_trigger"]] | None = None
    vanilla_hangs: bool = True
    stt_kinds: tuple[STTKind, ...] = ("inference_stt",)
    realtime: bool = False
    stall_mode: StallMode = "never_answer"
    item_delay: float = 0.0
    path: Path = "aclose"


_TOOL_CALL = (LLMReply(tool_calls=[("lookup", {})]),)
_LONG_TEXT = (LLMReply(text="Here is a long answer that takes a while to say out loud."),)

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
    ]
}

#: ``{id}@{stt_kind}`` for every scenario and every STT kind it runs with
E2E_IDS: tuple[str, ...] = tuple(f"{s.id}@{kind}" for s in E2E_SCENARIOS.values() for kind in s.stt_kinds)
