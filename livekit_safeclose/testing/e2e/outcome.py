"""What one end-to-end run observed, as the provider server counted it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .mcp import MCPSeen
from .models import STTKind


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
    run (``session.close``, ``CloseStream``, a client close frame for TTS and Realtime,
    ``[DONE]``). ``realtime_open_at_close`` / ``realtime_open_after``: the Realtime
    stand-in's open sockets (held upgrades included), at the same two moments as the STT
    counts. ``tasks_left``: what the post-close audit finds still running for the session
    (zombies included) ``SERVER_GRACE`` after the close returned (or after ``limit``), with
    ``tasks_left_names``. ``mcp``: for a scenario with an MCP server, what it and the loop
    showed after the close."""

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
    realtime_open_at_close: int = 0
    realtime_open_after: int = 0
    tasks_left: int = 0
    tasks_left_names: list[str] = field(default_factory=list)
    mcp: MCPSeen | None = None

    @property
    def released(self) -> bool:
        """The close returned and the provider holds no STT (or Realtime) connection any more."""
        return self.closed and self.stt_open_after == 0 and self.realtime_open_after == 0

    def summary(self) -> str:
        mode = "layer" if self.patched else "vanilla"
        closed = f"closed in {self.ms:.0f} ms" if self.closed else f"NOT closed after {self.ms:.0f} ms"
        return (
            f"{self.scenario}[{self.stt}, {mode}]: {closed}; server STT open before={self.stt_open_before} "
            f"at_close={self.stt_open_at_close} after={self.stt_open_after} zero_ms={self.stt_zero_ms} "
            f"reconnects during={self.stt_reconnects_during_close} after={self.stt_reconnects_after_close}; tts_open={self.tts_open_after} "
            f"llm_open={self.llm_open_after}; realtime_open at_close={self.realtime_open_at_close} "
            f"after={self.realtime_open_after}; tasks_left={self.tasks_left} {self.tasks_left_names}; "
            f"clean={self.clean_closes}; close_events={self.close_events}"
            + (f"; {self.mcp.summary()}" if self.mcp is not None else "")
            + (f"; error={self.error}" if self.error else "")
        )
