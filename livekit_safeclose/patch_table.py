"""Every target the layer patches, in one declarative table.

Each row names the upstream attribute, the factory that makes its replacement (every
replacement exposes ``__wrapped__``), the part it belongs to and what it changes; the
README's "How it works" table is this table (a test keeps them equal). :mod:`.patching`
applies and reverts rows; :mod:`.compat_table` lists what each part reads.
"""

from __future__ import annotations

from .options import Part
from .patching import Patch

SESSION = "livekit.agents.voice.agent_session:AgentSession"
ACTIVITY = "livekit.agents.voice.agent_activity:AgentActivity"
STT_FALLBACK = "livekit.agents.stt.fallback_adapter"
TTS_FALLBACK = "livekit.agents.tts.fallback_adapter"
BG_AUDIO_MODULE = "livekit.agents.voice.background_audio"
BG_AUDIO = BG_AUDIO_MODULE + ":BackgroundAudioPlayer"

CORE: frozenset[Part] = frozenset({"core"})
LEDGER: frozenset[Part] = frozenset({"stream_ledger"})

PATCHES: tuple[Patch, ...] = (
    Patch(CORE, SESSION, "_aclose_impl", "livekit_safeclose.session:wrap_aclose_impl",
          "every close path joins one shared closing task that runs upstream's close watched "
          "phase by phase; callers await it shielded"),
    Patch(CORE, SESSION, "_close_soon", "livekit_safeclose.session:wrap_close_soon",
          "a finished closing task is reset; a forced request escalates a graceful close"),
    Patch(CORE, SESSION, "_on_error", "livekit_safeclose.session:wrap_on_error",
          "during a graceful close (upstream ignores errors then): an error that would have "
          "closed the session escalates it", if_present=True),
    Patch(CORE, SESSION, "start", "livekit_safeclose.session:wrap_start",
          "the session is noted (weakly) as started: whom a shared model belongs to"),
    Patch(CORE, ACTIVITY, "drain", "livekit_safeclose.activity:wrap_drain",
          "while its session closes: bounded by the drain deadline, then the activity's tasks "
          "are force-cancelled lock-free and the cancellation absorbed"),
    Patch(CORE, ACTIVITY, "_detach_reusable_resources",
          "livekit_safeclose.activity:wrap_detach_reusable_resources",
          "what it hands to the next activity (a handoff, an AgentTask) is noted as the session's",
          if_present=True),
    Patch(CORE, ACTIVITY, "aclose", "livekit_safeclose.activity:wrap_aclose",
          "when force-closing: every tool cancelled first, upstream's body watched, streams "
          "stopped if a model close hangs"),
    Patch(CORE, ACTIVITY, "_pause_scheduling_task", "livekit_safeclose.adapters:wrap_pause_scheduling",
          "releases whose drain-blocked tasks are a list the pause replaces (before 1.6.1): "
          "the tasks the close exempted (a tool awaiting the close) stay blocked",
          shape="drain_blocked:list"),
    Patch(LEDGER, "livekit.agents.stt:RecognizeStream", "__init__", "livekit_safeclose.streams:stt_init",
          "registers the stream in the ledger until its main task ends"),
    Patch(LEDGER, "livekit.agents.tts:SynthesizeStream", "__init__", "livekit_safeclose.streams:tts_init",
          "registers the stream in the ledger until its main task ends"),
    Patch(LEDGER, "livekit.agents.tts:ChunkedStream", "__init__", "livekit_safeclose.streams:tts_init",
          "registers the stream in the ledger until its main task ends"),
    Patch(LEDGER, "livekit.agents.llm:LLMStream", "__init__", "livekit_safeclose.streams:llm_init",
          "registers the stream in the ledger until its main task ends"),
    Patch(LEDGER, "livekit.agents.llm:RealtimeSession", "__init__", "livekit_safeclose.streams:realtime_init",
          "registers the realtime session in the ledger (one loop turn later) until its main task ends"),
    Patch(CORE, "livekit.agents.beta.tools.end_call:EndCallTool", "_end_call",
          "livekit_safeclose.end_call:wrap_end_call",
          "a goodbye that does not finish within graceful_timeout closes the session by force",
          if_present=True),
    # -- BackgroundAudioPlayer (livekit_safeclose.background_audio) -----------------------
    Patch(CORE, BG_AUDIO, "__init__", "livekit_safeclose.background_audio:wrap_init",
          "the clips its mixer task decodes are noted with the player", if_present=True),
    Patch(CORE, BG_AUDIO_MODULE, "audio_frames_from_file",
          "livekit_safeclose.background_audio:wrap_audio_frames",
          "each clip decoded for a player is noted with it: the player's close awaits the "
          "clip's close instead of leaving it to the loop's finalizer", if_present=True),
    Patch(CORE, BG_AUDIO, "start", "livekit_safeclose.background_audio:wrap_start",
          "a player started with agent_session= is noted with it: the session's close closes it",
          if_present=True),
    Patch(CORE, BG_AUDIO, "aclose", "livekit_safeclose.background_audio:wrap_aclose",
          "from the start of the close, play() starts no task; the close ends once the clips "
          "it stopped are closed", if_present=True),
    Patch(CORE, BG_AUDIO, "play", "livekit_safeclose.background_audio:wrap_play",
          "on a closing or closed player: a done handle, no task", if_present=True),
    # -- FallbackAdapter recovery (livekit_safeclose.fallback) ----------------------------
    Patch(CORE, STT_FALLBACK + ":FallbackRecognizeStream", "_try_recovery",
          "livekit_safeclose.fallback:wrap_try_recovery",
          "the recovery stream is noted with the stream's session (cancelled when it closes); "
          "none is started while it closes"),
    Patch(CORE, TTS_FALLBACK + ":FallbackSynthesizeStream", "_try_recovery",
          "livekit_safeclose.fallback:wrap_try_recovery",
          "the probe is noted with the stream's session (cancelled when it closes); none is "
          "started while it closes (the stream's finally would start one)"),
    Patch(CORE, TTS_FALLBACK + ":FallbackChunkedStream", "_try_recovery",
          "livekit_safeclose.fallback:wrap_try_recovery", "same"),
    # -- MCP servers (livekit_safeclose.toolsets): applied once the `mcp` extra is imported --
    Patch(CORE, "livekit.agents.llm.mcp:MCPServer", "aclose", "livekit_safeclose.toolsets:wrap_server_aclose",
          "while its session closes: the MCP client's shutdown runs in its own task, never cut by a "
          "cancelled caller, bounded: a stdio server still running is terminated, then killed; an "
          "HTTP server's connections are closed", if_present=True, if_imported=True),
    Patch(CORE, "mcp.client.stdio", "_create_platform_compatible_process",
          "livekit_safeclose.toolsets:wrap_spawn",
          "notes which MCP client task started which stdio server process", if_present=True,
          if_imported=True),
    # -- worker lifecycle (livekit_safeclose.worker) ------------------------------------
    # the signal.signal tap is how every worker part sees the CLI's handler and the signal
    Patch(frozenset({"signal_guard", "drain_availability", "bounded_drain_end"}), "signal", "signal",
          "livekit_safeclose.worker.signals:tap",
          "once the CLI set its SIGTERM/SIGINT handler it stays in charge: the signal marks the "
          "worker draining; with signal_guard a later handler is recorded and run after the CLI's",
          on_revert="livekit_safeclose.worker.signals:untap"),
    Patch(frozenset({"signal_guard"}), "asyncio.unix_events:_UnixSelectorEventLoop", "add_signal_handler",
          "livekit_safeclose.worker.signals:wrap_add_signal_handler",
          "a SIGTERM/SIGINT loop callback runs too without displacing the CLI's handler; a "
          "SystemExit it raises is logged instead of ending the loop",
          on_revert="livekit_safeclose.worker.signals:guard_off"),
    Patch(frozenset({"drain_availability"}), "livekit.agents.worker:AgentServer", "_is_available",
          "livekit_safeclose.worker.availability:wrap_is_available",
          "False from the moment the drain signal arrived"),
    Patch(frozenset({"drain_availability"}), "livekit.agents.worker:AgentServer", "_update_worker_status",
          "livekit_safeclose.worker.availability:wrap_update_worker_status",
          "reports WS_FULL from the moment the drain signal arrived"),
    Patch(frozenset({"drain_availability"}), "livekit.agents.job:JobRequest", "accept",
          "livekit_safeclose.worker.availability:wrap_accept",
          "a request accepted after the drain began is answered unavailable (reject_late_accepts)",
          on_revert="livekit_safeclose.worker.servers:forget_all"),
    Patch(frozenset({"bounded_drain_end"}), "livekit.agents.worker:AgentServer", "drain",
          "livekit_safeclose.worker.drain_end:wrap_drain",
          "its timeout (or, with force_close_on_second_signal, a second signal) forces the end "
          "of the drain", on_revert="livekit_safeclose.worker.drain_end:reset"),
    Patch(frozenset({"bounded_drain_end"}), "livekit.agents.worker:AgentServer", "aclose",
          "livekit_safeclose.worker.drain_end:wrap_server_aclose",
          "outside a CLI run, when it returns the forced-end state is reset for a later drain"),
    Patch(frozenset({"bounded_drain_end"}), "livekit.agents.cli.cli", "_run_worker",
          "livekit_safeclose.worker.drain_end:wrap_run_worker",
          "when the CLI's worker run returns, the exit watchdog is cancelled and the forced-end "
          "state reset"),
    Patch(frozenset({"bounded_drain_end"}), "livekit.agents.ipc.supervised_proc:SupervisedProc", "aclose",
          "livekit_safeclose.worker.drain_end:wrap_proc_aclose",
          "once the drain is forced: the job is told why first, and its process killed if still "
          "alive proc_close_bound(close_timeout) later"),
    Patch(frozenset({"bounded_drain_end", "bounded_teardown"}), "livekit.agents.ipc.job_proc_lazy_main:_JobProc",
          "_shutdown_job", "livekit_safeclose.worker.job_shutdown:wrap_shutdown_job",
          "a forced reason closes the session first, bounded, and skips the 15 s entrypoint wait; "
          "with bounded_teardown each shutdown callback is bounded by close_timeout; every "
          "shutdown logs what the job process still runs"),
    Patch(frozenset({"bounded_drain_end"}), "livekit.agents.ipc.job_proc_lazy_main", "_SESSION_ACLOSE_TIMEOUT",
          "livekit_safeclose.worker.job_shutdown:session_guard",
          "close_timeout + 1 s (upstream: 60 s)", refresh=True),
    # -- the bounded teardown of a job (livekit_safeclose.worker.teardown) ----------------
    Patch(frozenset({"bounded_teardown"}), "livekit.agents.job:JobContext", "_on_session_end",
          "livekit_safeclose.worker.teardown:wrap_on_session_end",
          "during the job's shutdown: bounded by close_timeout (the recorder close, the session report)"),
    Patch(frozenset({"bounded_teardown"}), "livekit.rtc.room:Room", "disconnect",
          "livekit_safeclose.worker.teardown:wrap_room_disconnect",
          "during the job's shutdown: bounded by close_timeout"),
    Patch(frozenset({"bounded_teardown"}), "livekit.agents.ipc.supervised_proc:SupervisedProc", "_supervise_task",
          "livekit_safeclose.worker.teardown:wrap_supervise_task",
          "a process that said ShuttingDown and is still alive teardown_bound(close_timeout) "
          "later is killed"),
)  # fmt: skip
