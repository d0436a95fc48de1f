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
