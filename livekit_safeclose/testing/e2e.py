"""End-to-end close scenarios: the REAL provider plugins over real 127.0.0.1 sockets.

Where :mod:`.scenarios` injects faults with in-memory fakes, this module runs a roomless
``AgentSession`` with the real Silero VAD, the real STT plugin (LiveKit Inference or
Deepgram), the real OpenAI LLM plugin and the real Inference TTS plugin, all talking to a
:class:`~livekit_safeclose.testing.standins.ProviderServer`. What counts is the provider's
view: how many STT connections the *server* still holds after the close returned.

Entry points: :func:`run_e2e_scenario` (one scenario, layer or vanilla, returns an
:class:`E2EOutcome`) and :func:`run_churn` (many sessions against a concurrent-connection
quota). The building blocks (:class:`ScriptedAudioInput`, :func:`make_models`,
:func:`make_e2e_session`) are public for tests that need a custom flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from livekit import rtc
from livekit.agents import (
    Agent,
    AgentSession,
    APIConnectOptions,
    RunContext,
    function_tool,
    inference,
    llm,
    stt,
    tts,
)
from livekit.agents.voice import io
from livekit.agents.voice.agent_session import SessionConnectOptions

import livekit_safeclose as lsc

from ._runs import LayerForRun, cancel_since
from .fakes import FastAudioOutput
from .scenarios import load_vad
from .standins import KINDS, Kind, LLMReply, ProviderServer, tone_pcm16

__all__ = [
    "E2E_CONN_OPTIONS",
    "E2E_SCENARIOS",
    "ChurnOutcome",
    "E2EAgent",
    "E2EContext",
    "E2EModels",
    "E2EOutcome",
    "E2EScenario",
    "STTKind",
    "ScriptedAudioInput",
    "load_vad",
    "make_e2e_session",
    "make_models",
    "run_churn",
    "run_e2e_scenario",
]

STTKind = Literal["inference_stt", "deepgram_stt"]
AudioMode = Literal["tone", "silence", "mute"]

SAMPLE_RATE = 16000
FRAME_SAMPLES = SAMPLE_RATE // 50  # 20 ms

#: short timeouts so a stalled stand-in fails an attempt in seconds, not the default 10 s
E2E_CONN_OPTIONS = APIConnectOptions(timeout=2.0, max_retry=1, retry_interval=0.1)

#: the final-transcript wait of the e2e sessions (upstream default 2 s)
TRANSCRIPT_TIMEOUT = 0.3

#: time the server thread gets to account for a connection the client just dropped
SERVER_GRACE = 0.05

_POLL = 0.02


# -- audio I/O ---------------------------------------------------------------------------


class ScriptedAudioInput(io.AudioInput):
    """Real-time paced 20 ms frames at 16 kHz. ``mode``: ``"tone"`` (a 440 Hz tone the
    stand-in transcribes as speech and Silero hears as voice), ``"silence"`` (a quiet
    caller: audio keeps flowing) or ``"mute"`` (no frames at all: a caller who hung up,
    which the provider's idle timeout notices)."""

    def __init__(self, mode: AudioMode = "silence") -> None:
        super().__init__(label="ScriptedAudioInput")
        self._mode: AudioMode = mode
        self._changed = asyncio.Event()
        pcm = tone_pcm16(1.0, sample_rate=SAMPLE_RATE)  # 1 s = 50 whole periods: loops seamlessly
        step = FRAME_SAMPLES * 2
        self._tone = [self._frame(pcm[i : i + step]) for i in range(0, len(pcm), step)]
        self._silence = self._frame(bytes(step))
        self._i = 0
        self._next: float | None = None

    @staticmethod
    def _frame(data: bytes) -> rtc.AudioFrame:
        return rtc.AudioFrame(
            data=data, sample_rate=SAMPLE_RATE, num_channels=1, samples_per_channel=len(data) // 2
        )

    @property
    def mode(self) -> AudioMode:
        return self._mode

    @mode.setter
    def mode(self, mode: AudioMode) -> None:
        self._mode = mode
        self._changed.set()

    async def speak(self, seconds: float, then: AudioMode = "silence") -> None:
        """Send ``seconds`` of tone, then switch to ``then``."""
        self.mode = "tone"
        await asyncio.sleep(seconds)
        self.mode = then

    async def __anext__(self) -> rtc.AudioFrame:
        while self._mode == "mute":
            self._changed.clear()
            self._next = None
            await self._changed.wait()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._next = now + 0.02 if self._next is None else max(self._next + 0.02, now - 0.1)
        await asyncio.sleep(max(0.0, self._next - now))
        if self._mode == "tone":
            self._i = (self._i + 1) % len(self._tone)
            return self._tone[self._i]
        return self._silence


# -- models --------------------------------------------------------------------------------


@dataclass
class E2EModels:
    """The real plugins of one session, pointed at one stand-in server. ``aclose()``
    closes them (the TTS pool, the LLM client, the shared aiohttp session), bounded."""

    stt: stt.STT[Any]
    llm: llm.LLM[Any]
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


def make_models(server: ProviderServer, stt_kind: STTKind = "inference_stt") -> E2EModels:
    """Real STT (Inference or Deepgram), OpenAI LLM and Inference TTS against ``server``,
    sharing one fresh aiohttp session (no job context needed). Call inside a running loop."""
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

    return E2EModels(
        stt=model_stt,
        llm=openai.LLM(model="gpt-4o-mini", base_url=server.openai_url, api_key=server.provider_api_key),
        tts=inference.TTS(
            model="cartesia/sonic-3", base_url=server.inference_url, http_session=http, **creds
        ),
        http=http,
        stt_kind=stt_kind,
    )


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


# -- the agent -----------------------------------------------------------------------------

ToolMode = Literal["park", "ok"]
ExitMode = Literal["none", "park", "say", "reply"]


class E2EContext:
    """What the agent reports to the runner, and the switch that releases what it parked."""

    def __init__(self) -> None:
        self.tool_entered = asyncio.Event()
        self.exit_entered = asyncio.Event()
        self.release = asyncio.Event()


class E2EAgent(Agent):
    """``lookup`` parks until released (``tool="park"``) or answers; ``on_exit`` parks,
    says a goodbye through the TTS (``"say"``) or asks the LLM for one (``"reply"``)."""

    def __init__(self, ctx: E2EContext, *, tool: ToolMode = "ok", on_exit: ExitMode = "none") -> None:
        super().__init__(instructions="You are a test agent. Use lookup when asked.")
        self._ctx, self._tool, self._exit = ctx, tool, on_exit

    @function_tool
    async def lookup(self, context: RunContext[Any]) -> str:
        """Look something up."""
        self._ctx.tool_entered.set()
        if self._tool == "park":
            await self._ctx.release.wait()
        return "found it"

    async def on_exit(self) -> None:
        self._ctx.exit_entered.set()
        if self._exit == "park":
            await self._ctx.release.wait()
        elif self._exit == "say":
            await self.session.say("Goodbye, talk to you soon.")
        elif self._exit == "reply":
            await self.session.generate_reply(instructions="Say goodbye.")


# -- scenarios -----------------------------------------------------------------------------

Trigger = Literal["voice", "text", "none"]


@dataclass(frozen=True)
class E2EScenario:
    """One end-to-end close scenario.

    ``stall`` (kind, when): the stand-in stalls that kind ``never_answer``, set
    ``"before_start"`` (the pooled TTS socket prewarmed at start stalls too) or
    ``"before_trigger"``. ``engaged``: what must have happened before the close starts
    (``"tool"``: the tool was entered; ``"llm_open"``: the LLM request is held open;
    ``"llm_done"``: the LLM answered in full, so the reply text is in the TTS stream).
    ``vanilla_hangs``: whether unpatched livekit-agents is expected to hang on it."""

    id: str
    stuck: str
    description: str
    tool: ToolMode = "ok"
    on_exit: ExitMode = "none"
    script: tuple[LLMReply, ...] = ()
    trigger: Trigger = "none"
    engaged: Literal["start", "tool", "llm_open", "llm_done"] = "start"
    stall: tuple[Kind, Literal["before_start", "before_trigger"]] | None = None
    vanilla_hangs: bool = True


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


@dataclass
class E2EOutcome:
    """What one end-to-end run observed, counted by the SERVER.

    ``stt_open_at_close``: open STT connections ``SERVER_GRACE`` after the close returned
    (or after ``limit`` when it hung); ``stt_open_after``: at the end of the observation
    window (``observe`` seconds later); ``stt_zero_ms``: ms from the start of the close
    until the server first held no STT connection (``None``: never, in the window);
    ``stt_reconnects_during_close``: STT connections opened while ``aclose()`` ran (or
    until ``limit``); ``stt_reconnects_after_close``: opened after it returned (or after
    ``limit``), within the observation window.
    ``clean_closes``: per kind, connections that ended with a provider goodbye during the
    run (``session.close``, ``CloseStream``, a client close frame for TTS, ``[DONE]``)."""

    scenario: str
    stt: STTKind
    patched: bool
    closed: bool
    ms: float
    engaged: bool
    stt_open_before: int
    stt_open_at_close: int
    stt_open_after: int
    stt_zero_ms: float | None
    stt_connections: int
    stt_reconnects_during_close: int
    stt_reconnects_after_close: int
    tts_open_after: int
    llm_open_after: int
    clean_closes: dict[str, int]
    rejected: int
    close_events: int
    report: Any = None
    error: str = ""
    events: dict[str, list[str]] = field(default_factory=dict)

    @property
    def released(self) -> bool:
        """The close returned and the provider holds no STT connection any more."""
        return self.closed and self.stt_open_after == 0

    def summary(self) -> str:
        mode = "layer" if self.patched else "vanilla"
        closed = f"closed in {self.ms:.0f} ms" if self.closed else f"NOT closed after {self.ms:.0f} ms"
        return (
            f"{self.scenario}[{self.stt}, {mode}]: {closed}; server STT open before={self.stt_open_before} "
            f"at_close={self.stt_open_at_close} after={self.stt_open_after} zero_ms={self.stt_zero_ms} "
            f"reconnects during={self.stt_reconnects_during_close} after={self.stt_reconnects_after_close}; tts_open={self.tts_open_after} "
            f"llm_open={self.llm_open_after}; clean={self.clean_closes}; close_events={self.close_events}"
            + (f"; error={self.error}" if self.error else "")
        )


def _counters(server: ProviderServer) -> dict[str, dict[Kind, int]]:
    return {
        "total": {k: server.total_connections(k) for k in KINDS},
        "clean": {k: server.clean_closes(k) for k in KINDS},
        "rejected": {k: server.rejected(k) for k in KINDS},
    }


def _opens(server: ProviderServer, kind: Kind) -> int:
    """Websocket upgrades the server completed for ``kind`` (quota refusals in the
    default ``http429`` mode never get one)."""
    return sum(e.startswith("open#") for e in server.events(kind))


async def _wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def _cleanup(
    before: set[asyncio.Task[Any]],
    models: E2EModels | None,
    release: Callable[[], None],
    closer: asyncio.Future[Any] | None,
) -> None:
    """Release what is parked, stop what is left of the run, close the models: bounded."""
    release()
    if closer is not None and not closer.done():
        await asyncio.wait({closer}, timeout=0.3)
        closer.cancel()
    await cancel_since(before)
    if models is not None:
        await models.aclose()


async def _trigger(session: AgentSession[Any], audio: ScriptedAudioInput, how: Trigger) -> None:
    if how == "voice":
        # 0.8 s of "speech": the stand-in sends a final after 0.5 s of voice, Silero
        # hears the tone, and the turn ends on the silence that follows
        await audio.speak(0.8)
    elif how == "text":
        session.generate_reply(user_input="please look it up")


def _engaged_check(sc: E2EScenario, ctx: E2EContext, server: ProviderServer) -> Callable[[], bool]:
    if sc.engaged == "tool":
        return ctx.tool_entered.is_set
    if sc.engaged == "llm_open":
        return lambda: server.open_connections("llm") >= 1
    if sc.engaged == "llm_done":
        # the reply's text was streamed in full: it is in the (stalled) TTS stream now
        return lambda: any(e.startswith("closed#") and e.endswith(":clean") for e in server.events("llm"))
    return lambda: True


async def run_e2e_scenario(
    name: str | E2EScenario,
    *,
    patched: bool,
    server: ProviderServer,
    stt: STTKind = "inference_stt",
    drain_timeout: float = 0.5,
    close_timeout: float = 3.0,
    limit: float | None = None,
    observe: float | None = None,
    trigger: Trigger | None = None,
    mute_on_close: bool = False,
) -> E2EOutcome:
    """Run one end-to-end scenario in the current event loop against ``server`` (which
    the caller started and will stop; switches this run sets are restored after).

    ``patched``: install the layer for the run (the previous install state is restored
    after). ``limit``: how long to wait for ``aclose()`` before calling it hung (default:
    close bound + 1 s patched, 1 s vanilla). ``observe``: how long to keep watching the
    server after the close returned or hung (default: ``close_timeout`` patched, 0 s
    vanilla). ``trigger`` overrides the scenario's (e.g. ``"text"`` for speed).
    ``mute_on_close``: the caller hangs up as the close starts (no more audio frames).
    Whatever the outcome, the stuck tool/hook is released and the session's leftovers are
    cancelled before returning (bounded)."""
    sc = E2E_SCENARIOS[name] if isinstance(name, str) else name
    if limit is None:
        limit = close_timeout + 1.0 if patched or not sc.vanilla_hangs else 1.0
    if observe is None:
        observe = close_timeout if patched else 0.0
    install = LayerForRun(patched, drain_timeout=drain_timeout, close_timeout=close_timeout)
    saved = (server.stall, server.stall_kinds, list(server.llm_script))
    start_counts = _counters(server)
    before = set(asyncio.all_tasks())
    ctx = E2EContext()
    models: E2EModels | None = None
    closer: asyncio.Future[None] | None = None
    closes: list[Any] = []

    def _stall() -> None:
        assert sc.stall is not None
        server.stall_kinds = frozenset({sc.stall[0]})
        server.stall = "never_answer"

    def _release() -> None:
        ctx.release.set()
        server.stall, server.stall_kinds = saved[0], saved[1]
        server.llm_script[:] = saved[2]

    try:
        server.llm_script[:] = list(sc.script)
        if sc.stall is not None and sc.stall[1] == "before_start":
            _stall()
        models = make_models(server, stt)
        session, audio = make_e2e_session(models)
        session.on("close", closes.append)
        agent = E2EAgent(ctx, tool=sc.tool, on_exit=sc.on_exit)
        await session.start(agent)
        err = ""
        if not await server.await_open(stt, 1, 5.0):
            err = f"no {stt} connection after start"
        if sc.stall is not None and sc.stall[1] == "before_trigger":
            _stall()
        await _trigger(session, audio, trigger or sc.trigger)
        engaged = await _wait_until(_engaged_check(sc, ctx, server), 10.0)
        if not engaged and not err:
            err = f"scenario not engaged ({sc.engaged})"
        await asyncio.sleep(0.1)
        stt_before = server.open_connections(stt)

        total_at_close = server.total_connections(stt)
        t0 = time.monotonic()
        if mute_on_close:
            audio.mode = "mute"
        closer = asyncio.ensure_future(session.aclose())
        zero_ms: float | None = None

        def _poll() -> None:
            nonlocal zero_ms
            if zero_ms is None and server.open_connections(stt) == 0:
                zero_ms = round((time.monotonic() - t0) * 1000, 1)

        while not closer.done() and time.monotonic() - t0 < limit:
            _poll()
            await asyncio.wait({closer}, timeout=_POLL)
        ms = (time.monotonic() - t0) * 1000
        closed = closer.done() and not closer.cancelled() and closer.exception() is None
        if closer.done() and not closer.cancelled() and (exc := closer.exception()) is not None:
            err = err or repr(exc)
        t_end = time.monotonic()
        total_at_end = server.total_connections(stt)
        at_close: int | None = None
        while True:
            _poll()
            now = time.monotonic()
            if at_close is None and now >= t_end + SERVER_GRACE:
                at_close = server.open_connections(stt)
            if at_close is not None and now >= t_end + observe:
                break
            await asyncio.sleep(_POLL / 2)
        end = _counters(server)
        return E2EOutcome(
            scenario=sc.id,
            stt=stt,
            patched=patched,
            closed=closed,
            ms=round(ms, 1),
            engaged=engaged,
            stt_open_before=stt_before,
            stt_open_at_close=at_close,
            stt_open_after=server.open_connections(stt),
            stt_zero_ms=zero_ms,
            stt_connections=end["total"][stt] - start_counts["total"][stt],
            stt_reconnects_during_close=total_at_end - total_at_close,
            stt_reconnects_after_close=server.total_connections(stt) - total_at_end,
            tts_open_after=server.open_connections("inference_tts"),
            llm_open_after=server.open_connections("llm"),
            clean_closes={k: end["clean"][k] - start_counts["clean"][k] for k in KINDS},
            rejected=end["rejected"][stt] - start_counts["rejected"][stt],
            close_events=len(closes),
            report=lsc.last_close_report(session) if patched else None,
            error=err,
            events={k: server.events(k) for k in KINDS},
        )
    finally:
        try:
            await _cleanup(before, models, _release, closer)
        finally:
            install.restore()


# -- churn ----------------------------------------------------------------------------------


@dataclass
class ChurnOutcome:
    """Sessions run one after another against an STT quota. ``connected[i]``: session
    ``i`` got its STT connection (the server accepted it). ``rejected``: quota refusals
    seen by the server; ``stt_errors``: STT errors the sessions' plugins reported."""

    patched: bool
    sessions: int
    quota: int
    connected: list[bool]
    stuck: list[bool]
    closed: list[bool]
    rejected: int
    stt_errors: int
    stt_open_end: int
    ms: float

    @property
    def all_connected(self) -> bool:
        return all(self.connected)


async def run_churn(
    *,
    patched: bool,
    server: ProviderServer,
    sessions: int = 6,
    quota: int = 3,
    stuck: Callable[[int], bool] = lambda i: i % 2 == 0,
    stt: STTKind = "inference_stt",
    drain_timeout: float = 0.3,
    close_timeout: float = 2.0,
    limit: float | None = None,
    connect_wait: float = 1.5,
) -> ChurnOutcome:
    """``sessions`` sessions in turn, those where ``stuck(i)`` with a tool parked forever
    (reached through the real LLM), each closed with ``aclose()`` (waited for at most
    ``limit``, default close bound + 1 s patched, 0.5 s vanilla) while ``server.stt_quota``
    is ``quota``. On vanilla every stuck session keeps its STT connection, so the quota
    runs out and later sessions are refused; with the layer each close frees it."""
    if limit is None:
        limit = close_timeout + 1.0 if patched else 0.5
    install = LayerForRun(patched, drain_timeout=drain_timeout, close_timeout=close_timeout)
    saved = (server.stt_quota, list(server.llm_script))
    server.stt_quota = quota
    rejected0 = server.rejected(stt)
    before = set(asyncio.all_tasks())
    ctxs: list[E2EContext] = []
    all_models: list[E2EModels] = []
    closers: list[asyncio.Future[None]] = []
    connected: list[bool] = []
    stuck_l: list[bool] = []
    closed: list[bool] = []
    errors: list[Any] = []
    t0 = time.monotonic()

    def _release() -> None:
        for c in ctxs:
            c.release.set()
        server.stt_quota = saved[0]
        server.llm_script[:] = saved[1]

    try:
        for i in range(sessions):
            is_stuck = stuck(i)
            stuck_l.append(is_stuck)
            ctx = E2EContext()
            ctxs.append(ctx)
            server.llm_script[:] = list(_TOOL_CALL)
            models = make_models(server, stt)
            all_models.append(models)
            models.stt.on("error", errors.append)
            session, _audio = make_e2e_session(models)
            opens0, rej0 = _opens(server, stt), server.rejected(stt)

            def upgraded(opens0: int = opens0) -> bool:
                return _opens(server, stt) > opens0

            def refused(rej0: int = rej0) -> bool:
                return server.rejected(stt) > rej0

            await session.start(E2EAgent(ctx, tool="park" if is_stuck else "ok"))
            await _wait_until(lambda: upgraded() or refused(), connect_wait)
            connected.append(upgraded() and not refused())
            if is_stuck:
                session.generate_reply(user_input="please look it up")
                await _wait_until(ctx.tool_entered.is_set, 5.0)
            closer = asyncio.ensure_future(session.aclose())
            closers.append(closer)
            done, _ = await asyncio.wait({closer}, timeout=limit)
            closed.append(bool(done))
        await asyncio.sleep(SERVER_GRACE)
        return ChurnOutcome(
            patched=patched,
            sessions=sessions,
            quota=quota,
            connected=connected,
            stuck=stuck_l,
            closed=closed,
            rejected=server.rejected(stt) - rejected0,
            stt_errors=len(errors),
            stt_open_end=server.open_connections(stt),
            ms=round((time.monotonic() - t0) * 1000, 1),
        )
    finally:
        try:
            _release()
            pending = [c for c in closers if not c.done()]
            if pending:
                await asyncio.wait(pending, timeout=0.3)
            for c in pending:
                c.cancel()
            await cancel_since(before)
            await asyncio.gather(*(m.aclose() for m in all_models), return_exceptions=True)
        finally:
            install.restore()
