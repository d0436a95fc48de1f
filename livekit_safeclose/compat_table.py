"""Every upstream internal the layer touches, by the part that touches it.

Kept as data so a reader (or a test) can count it, and so :func:`.compat.check` can refuse a
release with a message that names exactly what is missing. Rows for public names are listed
only where the layer patches them.
"""

from __future__ import annotations

from .compat import Requirement as R

SESSION = "livekit.agents.voice.agent_session:AgentSession"
ACTIVITY = "livekit.agents.voice.agent_activity:AgentActivity"
EXECUTOR = "livekit.agents.voice.tool_executor:_ToolExecutor"
RECOGNITION = "livekit.agents.voice.audio_recognition:AudioRecognition"
SPEECH = "livekit.agents.voice.speech_handle:SpeechHandle"
OPTIONS = "livekit.agents.voice.agent_session:AgentSessionOptions"
TASK_INFO = "livekit.agents.voice.agent:_ActivityTaskInfo"
REUSABLE = "livekit.agents.voice.agent_activity:_ReusableResources"
SERVER = "livekit.agents.worker:AgentServer"
PROC = "livekit.agents.ipc.supervised_proc:SupervisedProc"
JOB_PROC = "livekit.agents.ipc.job_proc_lazy_main:_JobProc"
CLI = "livekit.agents.cli.cli:_run_worker"

CORE: tuple[R, ...] = (
    # patched: the close's entry points
    R("core", SESSION, "_aclose_impl", "method", ("reason", "drain", "error")),
    R("core", SESSION, "_close_soon", "method", ("reason", "drain", "error")),
    R("core", SESSION, "start", "method"),
    R("core", SESSION, "_on_error", "method", ("error",), optional=True),
    R("core", ACTIVITY, "drain", "method"),
    R("core", ACTIVITY, "aclose", "method"),
    # read by the close
    R("core", SESSION, "_closing_task", "init_attr"),
    R("core", SESSION, "_lock", "init_attr"),
    R("core", SESSION, "_activity", "init_attr"),
    R("core", SESSION, "_started", "init_attr"),
    R("core", SESSION, "_cancel_user_away_timer", "method"),
    R("core", SESSION, "_opts", "init_attr", optional=True),
    # absent before 1.5.3: the close waits a fixed 2 s (adapters.FIXED_TRANSCRIPT_WAIT)
    R("core", OPTIONS, "session_close_transcript_timeout", "field", optional=True),
    R("core", SESSION, "_agent", "init_attr", optional=True),  # the report's label
    R("core", ACTIVITY, "_session", "init_attr"),
    R("core", ACTIVITY, "_lock", "init_attr"),
    R("core", ACTIVITY, "_closed", "init_attr"),
    R("core", ACTIVITY, "_speech_tasks", "init_attr"),
    R("core", ACTIVITY, "_scheduling_atask", "init_attr"),
    R("core", ACTIVITY, "_scheduling_paused", "init_attr"),
    R("core", ACTIVITY, "_audio_recognition", "init_attr"),
    R("core", ACTIVITY, "_rt_session", "init_attr", optional=True),
    R("core", RECOGNITION, "_stt_pipeline", "init_attr", optional=True),
    # the backchannel-boundary timer a cut recognition close leaves armed (1.8.x)
    R("core", RECOGNITION, "_cancel_backchannel_boundary", "method", optional=True),
    # what a handoff's drain hands to the next activity (1.7.0+; adapters.handoff_parts)
    R("core", ACTIVITY, "_detach_reusable_resources", "method", ("new_activity",), optional=True),
    *(R("core", REUSABLE, name, "field", optional=True)
      for name in ("stt_pipeline", "rt_session", "turn_detector_stream")),
    R("core", RECOGNITION, "_turn_detector_stream", "init_attr", optional=True),
    R("core", "livekit.agents.voice.agent:Agent", "_activity", "init_attr"),
    R("core", "livekit.agents.voice.agent:AgentTask", "_old_agent", "init_attr"),
    R("core", "livekit.agents.voice.agent", "_get_activity_task_info", "attr"),
    R("core", "livekit.agents.voice.agent_activity", "_AgentActivityContextVar", "attr"),
    R("core", SPEECH, "_tasks", "init_attr"),
    R("core", SPEECH, "_mark_done", "method"),
    R("core", "livekit.agents.beta.tools.end_call:EndCallTool", "_end_call", "method", optional=True),
    # -- what differs between releases: one form each (see adapters) ---------------------
    # the running tools: the executor's registry, or (1.5.x) func_exec_* tasks tagged with
    # the speech handle that runs them
    R("core", ACTIVITY, "_tool_executor", "init_attr", shape="tool_registry:executor"),
    R("core", EXECUTOR, "_running_tasks", "init_attr", shape="tool_registry:executor"),
    R("core", TASK_INFO, "function_call", "field", shape="tool_registry:tagged_tasks"),
    R("core", TASK_INFO, "speech_handle", "field", shape="tool_registry:tagged_tasks"),
    # tasks drain() must not wait for: a set with an adder, or (before 1.6.1) a list that
    # the pause replaces (adapters.wrap_pause_scheduling puts the layer's entries back)
    R("core", ACTIVITY, "_add_drain_blocked_tasks", "method", shape="drain_blocked:set"),
    R("core", ACTIVITY, "_pause_scheduling_task", "method", ("blocked_tasks",), shape="drain_blocked:list"),
    R("core", ACTIVITY, "_pause_scheduling_task", "uses", ("_drain_blocked_tasks",), shape="drain_blocked:list"),
    R("core", ACTIVITY, "_wake_up_scheduling_task", "method", shape="drain_blocked:list"),
    # the audio recognition's close: private from 1.6.5, public before
    R("core", RECOGNITION, "_aclose", "method", shape="recognition_close:private"),
    R("core", RECOGNITION, "aclose", "method", shape="recognition_close:public"),
    # what start() runs its first activity in: _update_activity_task from 1.7.0, before
    # that _update_activity directly
    R("core", SESSION, "start", "uses", ("_update_activity_task",), shape="first_activity:update_activity_task"),
    R("core", SESSION, "_update_activity_task", "method", shape="first_activity:update_activity_task"),
    R("core", SESSION, "start", "uses", ("_update_activity",), shape="first_activity:update_activity"),
    R("core", SESSION, "_update_activity", "method", shape="first_activity:update_activity"),
)  # fmt: skip

BG_AUDIO = "livekit.agents.voice.background_audio:BackgroundAudioPlayer"
#: ``livekit_safeclose.background_audio``: optional (a release without the player has nothing
#: to close); the task slots are read where present
BACKGROUND_AUDIO: tuple[R, ...] = (
    R("core", BG_AUDIO, "__init__", "method", optional=True),
    R("core", "livekit.agents.voice.background_audio", "audio_frames_from_file", "attr", optional=True),
    R("core", BG_AUDIO, "start", "method", optional=True),
    R("core", BG_AUDIO, "aclose", "method", optional=True),
    R("core", BG_AUDIO, "play", "method", optional=True),
    R("core", BG_AUDIO, "_play_tasks", "init_attr", optional=True),
    R("core", BG_AUDIO, "_mixer_atask", "init_attr", optional=True),
    R(
        "core",
        "livekit.agents.voice.background_audio:PlayHandle",
        "_mark_playout_done",
        "method",
        optional=True,
    ),
)

STT_FALLBACK = "livekit.agents.stt.fallback_adapter"
TTS_FALLBACK = "livekit.agents.tts.fallback_adapter"

#: ``livekit_safeclose.fallback``: patched in every release since 1.5.0; the status slots
#: are read generically (their names changed in 1.6.9), a missing one narrows what is seen
FALLBACK: tuple[R, ...] = (
    R("core", f"{STT_FALLBACK}:FallbackRecognizeStream", "_try_recovery", "method"),
    R("core", f"{TTS_FALLBACK}:FallbackSynthesizeStream", "_try_recovery", "method"),
    R("core", f"{TTS_FALLBACK}:FallbackChunkedStream", "_try_recovery", "method"),
    R("core", f"{STT_FALLBACK}:FallbackRecognizeStream", "_fallback_adapter", "init_attr", optional=True),
    R("core", f"{TTS_FALLBACK}:FallbackSynthesizeStream", "_fallback_adapter", "init_attr", optional=True),
    R("core", f"{TTS_FALLBACK}:FallbackChunkedStream", "_fallback_adapter", "init_attr", optional=True),
    R("core", f"{STT_FALLBACK}:FallbackAdapter", "_status", "init_attr", optional=True),
    R("core", f"{TTS_FALLBACK}:FallbackAdapter", "_status", "init_attr", optional=True),
)

MCP = "livekit.agents.llm.mcp:MCPServer"
#: optional: the `mcp` extra may not be installed (then no session holds an MCP server)
TOOLSETS: tuple[R, ...] = (
    R("core", MCP, "aclose", "method", optional=True),
    R("core", MCP, "_client_task", "init_attr", optional=True),
    R("core", "livekit.agents.llm.mcp:MCPServerHTTP", "_http_client", "init_attr", optional=True),
    R("core", "livekit.agents.llm.mcp:MCPToolset", "_mcp_server", "init_attr", optional=True),
    R("core", "livekit.agents.llm.async_toolset:AsyncToolset", "_executor", "init_attr", optional=True),
    R("core", ACTIVITY, "_mcp_tools", "init_attr", optional=True),
    R("core", "mcp.client.stdio", "_create_platform_compatible_process", "attr", optional=True),
)

STREAM_LEDGER: tuple[R, ...] = (
    R("stream_ledger", "livekit.agents.stt:RecognizeStream", "_task", "init_attr"),
    R("stream_ledger", "livekit.agents.tts:SynthesizeStream", "_task", "init_attr"),
    R("stream_ledger", "livekit.agents.tts:ChunkedStream", "_synthesize_task", "init_attr"),
    R("stream_ledger", "livekit.agents.llm:LLMStream", "_task", "init_attr"),
    R("stream_ledger", "livekit.agents.llm:RealtimeSession", "__init__", "method"),
    # the OpenAI plugin's main task; without it the ledger finds the task working for the session
    R(
        "stream_ledger",
        "livekit.plugins.openai.realtime:RealtimeSession",
        "_main_atask",
        "init_attr",
        optional=True,
    ),
)

# Worker parts (livekit_safeclose.worker). Public API they only call (AgentServer.draining,
# JobContext.primary_session, get_job_context, SupervisedProc.kill/pid/running_job) needs no
# row; what they patch, and every private name they read, has one.
CLI_MODULE = "livekit.agents.cli.cli"
POOL = "livekit.agents.ipc.proc_pool:ProcPool"

SIGNAL_GUARD: tuple[R, ...] = (
    # the CLI whose handler the tap keeps in charge (recognised by its module)
    R("signal_guard", CLI_MODULE, "_run_worker", "attr"),
    R("signal_guard", "asyncio.unix_events:_UnixSelectorEventLoop", "add_signal_handler", "method"),
)

DRAIN_AVAILABILITY: tuple[R, ...] = (
    R("drain_availability", CLI_MODULE, "_run_worker", "attr"),
    R("drain_availability", SERVER, "_is_available", "method"),
    R("drain_availability", SERVER, "_update_worker_status", "method"),
    R("drain_availability", SERVER, "_queue_msg", "method"),
    R("drain_availability", SERVER, "active_jobs", "attr"),  # the WS_FULL report's job count
    R("drain_availability", "livekit.agents.job:JobRequest", "accept", "method"),
    R("drain_availability", "livekit.agents.job:JobRequest", "reject", "method", ("terminate",)),
)

BOUNDED_DRAIN_END: tuple[R, ...] = (
    # supervisor side (worker.drain_end)
    R("bounded_drain_end", CLI_MODULE, "_run_worker", "method"),
    R("bounded_drain_end", SERVER, "drain", "method"),
    R("bounded_drain_end", SERVER, "aclose", "method"),
    R("bounded_drain_end", SERVER, "active_jobs", "attr"),  # the drain's log line
    R("bounded_drain_end", PROC, "aclose", "uses", ("_pch",)),  # assigned in _start, read by aclose
    R("bounded_drain_end", "livekit.agents.ipc.channel", "asend_message", "attr"),
    R("bounded_drain_end", "livekit.agents.ipc.proto:ShutdownRequest", "reason", "field"),
    # job side (worker.job_shutdown)
    R("bounded_drain_end", JOB_PROC, "_shutdown_job", "method", ("job_entry_task", "shutdown_info")),
    R("bounded_drain_end", JOB_PROC, "_shutdown_job", "uses", ("_SESSION_ACLOSE_TIMEOUT",)),
    R("bounded_drain_end", JOB_PROC, "_session_end_timeout", "init_attr"),
    R("bounded_drain_end", "livekit.agents.ipc.job_proc_lazy_main", "_SESSION_ACLOSE_TIMEOUT", "attr"),
)

BOUNDED_TEARDOWN: tuple[R, ...] = (
    R("bounded_teardown", JOB_PROC, "_shutdown_job", "method", ("job_entry_task", "shutdown_info")),
    R("bounded_teardown", JOB_PROC, "_shutdown_job", "uses", ("_job_ctx", "_room")),
    R("bounded_teardown", "livekit.agents.job:JobContext", "_shutdown_callbacks", "init_attr"),
    R("bounded_teardown", "livekit.agents.job:JobContext", "_on_session_end", "method"),
    R("bounded_teardown", "livekit.rtc.room:Room", "disconnect", "method"),
    R("bounded_teardown", PROC, "_supervise_task", "method"),
    R("bounded_teardown", PROC, "_shutting_down_fut", "init_attr"),
    R("bounded_teardown", PROC, "aclose", "uses", ("_supervise_atask",)),
)

#: only with force_close_on_second_signal: the CLI's exit-now handlers, whose closures tell an
#: operator's second signal from the CLI's own blocked-loop re-signal. Missing, the part is
#: refused by name and a second signal exits at once, as upstream.
SECOND_SIGNAL: tuple[R, ...] = (
    R("force_close_on_second_signal", CLI, "_force_exit", "closure", ("escalating",)),
    R("force_close_on_second_signal", CLI, "_handle_exit", "closure", ("escalating", "exit_raised")),
)

IDLE_REPORT: tuple[R, ...] = (
    # assigned when the server runs
    R("idle_report", SERVER, "run", "uses", ("_proc_pool", "_inference_executor"), optional=True),
    R("idle_report", PROC, "_initialize_fut", "init_attr", optional=True),  # idle vs starting
    R("idle_report", POOL, "_default_num_idle_processes", "init_attr", optional=True),
)

REQUIREMENTS: tuple[R, ...] = (
    CORE
    + FALLBACK
    + BACKGROUND_AUDIO
    + TOOLSETS
    + STREAM_LEDGER
    + SIGNAL_GUARD
    + DRAIN_AVAILABILITY
    + BOUNDED_DRAIN_END
    + BOUNDED_TEARDOWN
    + SECOND_SIGNAL
    + IDLE_REPORT
)
