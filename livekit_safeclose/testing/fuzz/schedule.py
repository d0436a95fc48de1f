"""A schedule: one generated interleaving, as plain data.

A schedule is a :class:`Setup` (the bounds and the faults the session is built with) and a
tuple of :class:`Step` s replayed in order on a real ``AgentSession``. Being data, it can be
generated (:mod:`.strategies`), shrunk, printed as source (:meth:`Schedule.source`, what a
catalogue regression scenario holds) and sent to a worker process as JSON. Nothing here
imports livekit-agents.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

#: how an agent hook (``on_enter``/``on_exit``) behaves: returns at once (``None``), takes a
#: finite while (``slow``), never returns (``park``), or swallows every cancellation
Hook = Literal["slow", "park", "swallow"] | None
#: how a fake provider stream behaves when cancelled (see :data:`..fakes.CloseFault`)
Fault = Literal["none", "hang", "swallow"]
#: a toolset (think MCP server) whose ``setup()`` or ``aclose()`` never returns
ToolsetFault = Literal["setup", "close", "session-close"] | None

#: the tools the fake LLM calls when a user turn asks for them (``user`` step, ``tool:X``)
TOOLS: tuple[str, ...] = (
    "fast",  # returns at once
    "slow",  # a finite call: SLOW_S
    "stuck",  # awaits forever, honours cancellation
    "swallow",  # awaits forever, swallows cancellation
    "aclose",  # awaits its own session's aclose()
    "shutdown",  # calls session.shutdown() (graceful) and returns
    "handoff",  # hands off to a second agent
    "task",  # awaits an AgentTask that completes at once
    "stuck_task",  # awaits an AgentTask whose on_enter never returns
    "playout",  # awaits the playout of the speech that called it
    "say",  # speaks from inside the tool without awaiting it
)

#: how long a ``slow`` tool or hook takes
SLOW_S = 0.15

StepKind = Literal[
    "wait",  # arg: milliseconds
    "started",  # wait (bounded) until start() returned
    "user",  # arg: "text" | "stall" | "tool:<name>" | "talk+tool:<name>"
    "say",  # arg: allow_interruptions
    "interrupt",  # arg: force
    "hangup",  # the caller hangs up: the audio sink dies (never reports playout)
    "tts_stall",  # from now on every TTS stream stalls
    "error",  # arg: "stt" | "llm" | "tts": unrecoverable errors, an error close
    "close",  # arg: a close path (CLOSE_PATHS)
    "restart",  # wait until every close ended, then start the session again
]

#: ``aclose``: awaited; ``shutdown``: shutdown(drain=False); ``graceful``: shutdown(drain=True);
#: ``disconnect``: close-on-disconnect; ``job``: the job's shutdown callback under its timeout
CLOSE_PATHS: tuple[str, ...] = ("aclose", "shutdown", "graceful", "disconnect", "job")


@dataclass(frozen=True)
class Setup:
    """What the session is built with. The defaults are what shrinking goes back to."""

    drain_timeout: float = 0.2
    close_timeout: float = 1.0
    graceful_timeout: float = 0.5
    transcript_timeout: float = 0.05
    on_enter: Hook = None
    on_exit: Hook = None
    #: the hooks of the agent a ``handoff`` tool hands off to
    next_on_enter: Hook = None
    next_on_exit: Hook = None
    stt_close: Fault = "none"
    llm_close: Fault = "none"
    tts_close: Fault = "none"
    #: the STT answers the close's end-of-turn flush with the caller's last words
    final_on_flush: bool = False
    toolset: ToolsetFault = None
    #: the sink is dead from the start
    dead_sink: bool = False

    def bound(self, graceful: bool) -> float:
        """How long a close request may take: ``close_timeout``, plus ``graceful_timeout``
        for a graceful one (it escalates then)."""
        return self.close_timeout + (self.graceful_timeout if graceful else 0.0)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    arg: str | float | bool | None = None

    def source(self) -> str:
        return f"Step({self.kind!r})" if self.arg is None else f"Step({self.kind!r}, {self.arg!r})"


@dataclass(frozen=True)
class Schedule:
    setup: Setup = field(default_factory=Setup)
    steps: tuple[Step, ...] = ()

    def source(self, indent: str = "", setup_name: str = "Setup") -> str:
        """Python source that rebuilds this schedule (non-default setup fields only), with
        :class:`Setup` imported as ``setup_name``."""
        defaults = Setup()
        changed = [
            f"{f.name}={getattr(self.setup, f.name)!r}"
            for f in dataclasses.fields(Setup)
            if getattr(self.setup, f.name) != getattr(defaults, f.name)
        ]
        inner = indent + "    "
        steps = "".join(f"{inner}    {s.source()},\n" for s in self.steps)
        body = f"(\n{steps}{inner})" if steps else "()"
        return f"Schedule(\n{inner}{setup_name}({', '.join(changed)}),\n{inner}{body},\n{indent})"

    def describe(self) -> str:
        """One line: the setup's changes and the steps."""
        defaults = Setup()
        changed = [
            f"{f.name}={getattr(self.setup, f.name)}"
            for f in dataclasses.fields(Setup)
            if getattr(self.setup, f.name) != getattr(defaults, f.name)
        ]
        steps = " -> ".join(s.kind if s.arg is None else f"{s.kind}({s.arg})" for s in self.steps)
        return f"[{', '.join(changed) or 'defaults'}] {steps}"

    def to_json(self) -> str:
        return json.dumps(
            {"setup": dataclasses.asdict(self.setup), "steps": [[s.kind, s.arg] for s in self.steps]}
        )

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> Schedule:
        data = json.loads(text) if isinstance(text, str) else text
        return cls(Setup(**data["setup"]), tuple(Step(k, a) for k, a in data["steps"]))
