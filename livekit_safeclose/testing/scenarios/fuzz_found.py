"""The regressions ``livekit-safeclose fuzz`` found, one per bug, as minimal schedules.

Each entry is what the fuzzer printed for a failure (ready to paste), kept as a catalogue
scenario (tagged ``fuzz``) so ``check``, the plugin and the benchmarks replay it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..fuzz.schedule import Schedule, Step
from ..fuzz.schedule import Setup as FuzzSetup

if TYPE_CHECKING:
    from .catalogue import ClosePath


@dataclass(frozen=True)
class FuzzFound:
    """A failure ``livekit-safeclose fuzz`` found, as its minimal schedule (the command
    prints this entry ready to paste)."""

    id: str
    stuck: str
    schedule: Schedule
    vanilla_hangs: bool = True
    #: vanilla closes in time but leaves tasks behind (the bug is the leak)
    vanilla_leaks: bool = False
    description: str = ""


#: regression scenarios from the fuzzer, one per bug it found (its minimal schedule)
FUZZ_FOUND: tuple[FuzzFound, ...] = (
    FuzzFound(
        "fuzz-stt-close-hang-tight-bound",
        "STT close hangs, close_timeout too short for the model-close allowance",
        Schedule(FuzzSetup(stt_close="hang"), ()),
        description="With close_timeout=1.0 the forced aclose's model-close watchdog and the "
        "phase bound fell on the same instant: the phase bound abandoned upstream's close "
        "before the hung STT stream was stopped, and the final sweep no longer found the "
        "stream (its creator was cancelled first): a provider connection and the turn "
        "detector's tasks stayed open.",
    ),
    FuzzFound(
        "fuzz-zombie-tool-tight-bound",
        "tool swallowing CancelledError, default fuzz bounds (close_timeout=1.0)",
        Schedule(FuzzSetup(), (Step("started"), Step("user", "tool:swallow"), Step("wait", 50),
                               Step("close", "aclose"))),
        description="Forcing and quarantining the zombie took two full unwind graces past the "
        "drain bound, the whole teardown bound: the activity was never closed, leaving the "
        "turn detector's tasks and the user-state timer behind.",
    ),
    FuzzFound(
        "fuzz-graceful-stt-close-hang",
        "graceful close whose STT stream close hangs",
        Schedule(FuzzSetup(stt_close="hang"), (Step("started"), Step("close", "graceful"))),
        description="A graceful close waited for the activity's close up to the phase bound, "
        "where the phase bound abandoned it at the same instant: the hung stream was never "
        "stopped, the turn detector's tasks leaked, and the report said forced without "
        "saying escalated.",
    ),
    FuzzFound(
        "fuzz-graceful-goodbye-queued-reply",
        "graceful close during start(), the caller hangs up, a second reply queued",
        Schedule(FuzzSetup(), (Step("wait", 0), Step("user", "text"), Step("close", "graceful"),
                               Step("hangup"), Step("user", "text"))),
        description="The queued reply's speech task waits for its turn in a helper task of its "
        "SpeechHandle (_wait_for_authorization); forcing the speech task at the graceful "
        "bound does not reach that helper, and the layer did not count the handle as "
        "working for the session: the task outlived the close.",
    ),
    FuzzFound(
        "fuzz-forced-on-exit-last-words",
        "forced close while a slow on_exit runs; the caller's last words arrive on the flush",
        Schedule(FuzzSetup(on_exit="slow", final_on_flush=True), ()),
        vanilla_hangs=False,
        description="drain() awaits on_exit before it pauses scheduling; forced there, it never "
        "paused it, so the last words the close's flush committed took the running path (a "
        "reply, cancelled by the close) instead of landing in the history. Vanilla, which "
        "waits for on_exit, keeps them.",
    ),
    FuzzFound(
        "fuzz-zombie-on-exit-shutdown",
        "on_exit swallowing CancelledError, shutdown(drain=False)",
        Schedule(FuzzSetup(on_exit="swallow"), (Step("started"), Step("close", "shutdown"))),
        description="Upstream's close was abandoned in its drain, whose zombie on_exit keeps "
        "the activity lock: the activity's own close then waited for that lock until it was "
        "abandoned too, so the activity was never closed and stayed attached to the closed "
        "session (session._activity).",
    ),
    FuzzFound(
        "fuzz-hangup-during-restarted-close",
        "the caller hangs up while a restarted session closes (the sink replaced mid-close)",
        Schedule(FuzzSetup(), (Step("started"), Step("close", "graceful"), Step("started"),
                               Step("close", "job"), Step("user", "talk+tool:shutdown"),
                               Step("hangup"))),
        vanilla_hangs=False,
        description="The audio output was replaced by a dead sink after the close began; "
        "upstream detaches the outputs right after the drain, so the layer, which noted the "
        "sinks only when the close began, never saw the new one: a reply's "
        "AudioOutput.wait_for_playout task on it outlived the close.",
    ),
    FuzzFound(
        "fuzz-graceful-llm-stall-close-hang",
        "graceful close while the LLM stalls; its stream's close waits for a goodbye",
        Schedule(FuzzSetup(llm_close="hang"), (Step("started"), Step("user", "stall"), Step("wait", 50),
                                               Step("close", "graceful"))),
        description="Forced at the escalated drain bound, the speech task was cancelled, not "
        "interrupted: upstream then never closes the LLM stream it opened (its inference "
        "task lives on), and the final sweep's one cancellation only started the stream's "
        "goodbye wait: the provider connection stayed open with the inference, segment and "
        "metrics tasks. Fuzz #2 (an aclose waiting for start(), a reply slipping in) and "
        "#5529 (the TTS twin) are this bug.",
    ),
    FuzzFound(
        "fuzz-graceful-tts-stall-close-hang",
        "graceful close while the TTS stalls; its stream's close waits for a goodbye",
        Schedule(FuzzSetup(tts_close="hang"), (Step("started"), Step("tts_stall"), Step("user", "text"),
                                               Step("wait", 50), Step("close", "graceful"))),
        description="The TTS twin of fuzz-graceful-llm-stall-close-hang: the TTS stream of a "
        "speech cancelled at the drain bound stayed open at the provider.",
    ),
    FuzzFound(
        "fuzz-aclose-during-start-reply-slips-in",
        "aclose() while start() runs; a stalled reply starts before upstream's close does",
        Schedule(FuzzSetup(llm_close="hang"), (Step("wait", 10), Step("close", "aclose"), Step("started"),
                                               Step("user", "stall"))),
        vanilla_hangs=False,
        description="Fuzz #2 as found. The layer's close waits for start() and runs upstream's "
        "close a loop turn later, so a reply asked for in between starts; vanilla's close, "
        "queued on the session lock, runs first. The reply's LLM stream then stayed open "
        "as in fuzz-graceful-llm-stall-close-hang.",
    ),
    FuzzFound(
        "fuzz-handoff-stt-close-hang",
        "a close during a handoff whose carried-over STT stream's close hangs",
        Schedule(FuzzSetup(stt_close="hang", on_exit="slow"),
                 (Step("started"), Step("user", "tool:handoff"), Step("wait", 150), Step("close", "aclose"))),
        vanilla_hangs=False,
        vanilla_leaks=True,
        description="The handoff's drain hands the STT pipeline to the next activity; the "
        "session closing meanwhile, the handoff closes that pipeline itself. Held by no "
        "activity, the pipeline's stream was outside the close's view: its hung close kept "
        "the provider connection and the handoff task open (fuzz #8603).",
    ),
    FuzzFound(
        "fuzz-forced-before-graceful-opened",
        "shutdown(drain=True) then at once shutdown(drain=False), on_exit swallowing",
        Schedule(FuzzSetup(on_exit="swallow"), (Step("started"), Step("close", "graceful"),
                                                Step("close", "shutdown"))),
        description="shutdown() only creates the closing task; the forced request right after "
        "found no close to escalate (and upstream drops it: a closing task exists), so the "
        "close stayed graceful until graceful_timeout; its bounds also ran from when the "
        "task first ran, not from the request (fuzz #284, there during start()).",
    ),
    FuzzFound(
        "fuzz-unrecoverable-error-during-graceful",
        "an unrecoverable LLM error during a graceful close while the LLM stalls",
        Schedule(FuzzSetup(graceful_timeout=1.5), (Step("started"), Step("user", "stall"),
                                                   Step("close", "graceful"), Step("error", "llm"))),
        description="Upstream ignores every error once a closing task exists: the error close "
        "never happened and the graceful close waited for graceful_timeout, past the "
        "error's close_timeout bound.",
    ),
    FuzzFound(
        "fuzz-graceful-drain-blocked-on-enter",
        "graceful close while a slow on_enter runs, an AgentTask awaited meanwhile",
        Schedule(FuzzSetup(on_enter="slow"), (Step("wait", 0), Step("close", "graceful"),
                                              Step("user", "tool:task"))),
        vanilla_hangs=False,
        vanilla_leaks=True,
        description="The AgentTask marks the running on_enter drain-blocked; upstream's drain "
        "skips it and nothing cancels it: it outlived the close. A graceful close now "
        "lets it finish within its bound (fuzz #1238).",
    ),
    FuzzFound(
        "fuzz-agent-task-stt-close-hang",
        "teardown while a stuck AgentTask runs, the TTS stalled, the STT stream's close hangs",
        Schedule(FuzzSetup(stt_close="hang"), (Step("started"), Step("tts_stall"),
                                               Step("user", "talk+tool:stuck_task"), Step("wait", 50))),
        description="The STT stream was matched to its session only at the end of the close, "
        "through the pipeline that made it; the recognition close the close cut short had "
        "dropped that pipeline by then, so the sweep never saw the stream (its hung close "
        "kept the provider connection and the pump open). Streams are now matched when "
        "the close begins (fuzz seed 7 #642).",
    ),
    FuzzFound(
        "fuzz-graceful-zombie-tool-reply",
        "graceful close escalated on a tool swallowing CancelledError",
        Schedule(FuzzSetup(), (Step("wait", 0), Step("user", "tool:swallow"), Step("close", "graceful"))),
        description="Quarantine marked the zombie's speech handle done without interrupting it "
        "(upstream never leaves a handle done but not interrupted): the tool reply upstream "
        "still created on that handle waited for an authorization that never came, and its "
        "_wait_for_authorization helper with it. The forced activity close then gave the "
        "already forced zombie tool a whole unwind grace, the rest of the teardown bound: "
        "the activity's close was abandoned and the turn detector's tasks were left.",
    ),
    FuzzFound(
        "fuzz-tool-shutdown-zombie-timer",
        "tool swallowing CancelledError, then a tool calls shutdown() (graceful)",
        Schedule(FuzzSetup(), (Step("wait", 0), Step("user", "tool:swallow"), Step("user", "tool:shutdown"),
                               Step("wait", 50))),
        description="The zombie tool's speech ends only after the close, when the leftover "
        "cancel reaches the tool's wrapper; its done callback sets the agent state listening "
        "and re-arms upstream's user-away timer on the closed session (it fires 15 s later).",
    ),
    FuzzFound(
        "fuzz-hangup-replaced-dead-sink",
        "a reply into a dead sink, the caller hangs up (the sink replaced), teardown",
        Schedule(FuzzSetup(dead_sink=True), (Step("wait", 0), Step("user", "text"), Step("wait", 0),
                                             Step("hangup"), Step("wait", 50))),
        description="The reply's AudioOutput.wait_for_playout task waits on the sink it "
        "started on, which the hangup replaced before the close began: no output of the "
        "session any more, so the layer did not count the task as working for the session "
        "and it outlived the close.",
    ),
    FuzzFound(
        "fuzz-stuck-task-stt-close-hang-tight-bound",
        "a tool stuck in an AgentTask's on_enter, STT close hangs, close_timeout=0.6",
        Schedule(FuzzSetup(close_timeout=0.6, stt_close="hang"), (Step("wait", 0), Step("user", "tool:stuck_task"),
                                                                  Step("wait", 50))),
        description="The hung STT stream's sweep used up the teardown bound, so the audio "
        "recognition's close was abandoned before it closed the turn detector's stream; the "
        "layer did not count that stream as working for the session, and its two tasks "
        "outlived the close.",
    ),
    FuzzFound(
        "fuzz-error-close-reply-after-force",
        "an error close forced past a zombie on_exit; a reply asked for after the forcing",
        Schedule(FuzzSetup(on_exit="swallow"), (Step("started"), Step("wait", 10), Step("error", "tts"),
                                                Step("wait", 100), Step("user", "stall"))),
        description="Fuzz seed 1 #1118 (failed 4 of 10 replays). The reply was created on the activity after "
        "the drain bound forced it; upstream's aclose cancelled its speech task, which left "
        "the SpeechHandle._wait_for_authorization helper parked. The layer counted a "
        "speech's handle as working for the session only for speeches alive at the forcing: "
        "the helper outlived the close. Every speech created from the first forcing on now "
        "counts (the session's speech_created event, listened to until the close ends).",
    ),
    FuzzFound(
        "fuzz-zombie-tools-queued-reply-end",
        "a graceful close escalated past two zombie tools; a reply cancelled just as it ends",
        Schedule(FuzzSetup(drain_timeout=0.3, stt_close="hang", tts_close="hang"),
                 (Step("started"), Step("user", "tool:swallow"), Step("close", "graceful"),
                  Step("close", "disconnect"), Step("user", "talk+tool:swallow"), Step("close", "shutdown"))),
        description="Fuzz seed 1 #6959 (its minimal form failed 6 of 12 replays). A reply the close "
        "cancelled was done when the close ended, but upstream's done callbacks for it (the "
        "pipeline reply's, a tool's end) were still queued; they set the closed session's "
        "agent state listening and re-armed the user-away timer after the close disarmed it. "
        "The layer disarmed again only after tasks not yet done; a done task's disarm now "
        "runs behind its queued callbacks.",
    ),
    FuzzFound(
        "fuzz-agent-task-tool-closes-own-activity",
        "a tool awaits an AgentTask; a handoff meanwhile; then the close",
        Schedule(FuzzSetup(), (Step("started"), Step("user", "talk+tool:task"),
                               Step("user", "talk+tool:handoff"), Step("wait", 300))),
        vanilla_hangs=False,
        vanilla_leaks=True,
        description="Fuzz seed 11 #1260, which had killed its fuzz worker (Task.cancel() "
        "recursing around the await cycle it left, in the cleanup). The agent changed while "
        "the AgentTask ran, so upstream closes the paused activity from inside the tool that "
        "awaited the task; that close's tool drain then waits for the same, non-cancellable "
        "tool: a self-await. The tool, its speech and their tasks outlived every close. The "
        "layer takes a tool that closes its own activity out of the executor's registry "
        "first, as a drain's blocked tasks are. The shrunk form started with wait(0) and closed "
        "50 ms in: on a loaded machine the close then came before the tool ran (8/8 with this "
        "form under load, 0/6 with that one).",
    ),
)  # fmt: skip


def path_of(schedule: Schedule) -> ClosePath:
    """The first close path of a schedule, as the catalogue names paths."""
    names: dict[str, ClosePath] = {"graceful": "graceful", "shutdown": "shutdown", "disconnect": "disconnect"}
    for step in schedule.steps:
        if step.kind == "error":
            return "error"
        if step.kind == "close":
            return names.get(str(step.arg), "aclose")
    return "aclose"
