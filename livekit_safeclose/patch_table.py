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

CORE: frozenset[Part] = frozenset({"core"})
LEDGER: frozenset[Part] = frozenset({"stream_ledger"})

PATCHES: tuple[Patch, ...] = (
    Patch(CORE, SESSION, "_aclose_impl", "livekit_safeclose.session:wrap_aclose_impl",
          "every close path joins one shared closing task that runs upstream's close watched "
          "phase by phase; callers await it shielded"),
    Patch(CORE, SESSION, "_close_soon", "livekit_safeclose.session:wrap_close_soon",
          "a finished closing task is reset; a forced request escalates a graceful close"),
    Patch(CORE, SESSION, "start", "livekit_safeclose.session:wrap_start",
          "the session is noted (weakly) as started: whom a shared model belongs to"),
    Patch(CORE, ACTIVITY, "drain", "livekit_safeclose.activity:wrap_drain",
          "while its session closes: bounded by the drain deadline, then the activity's tasks "
          "are force-cancelled lock-free and the cancellation absorbed"),
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
    Patch(CORE, "livekit.agents.beta.tools.end_call:EndCallTool", "_end_call",
          "livekit_safeclose.end_call:wrap_end_call",
          "a goodbye that does not finish within graceful_timeout closes the session by force",
          if_present=True),
    # -- worker lifecycle (livekit_safeclose.worker) ------------------------------------
)  # fmt: skip
