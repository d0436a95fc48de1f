"""The harness behind the ``safeclose`` pytest fixture (see :mod:`.plugin`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..adapters import running_tools
from ..audit import audit
from ..bounded_close import closing_of
from ..report import last_close_report
from .fakes import FakeLLM, FakeReply, FakeSTT, FakeTTS, FastAudioOutput, ProviderLedger, SilenceInput
from .features import transcript_kwargs
from .scenarios import ClosePath, load_vad


class SafeCloseHarness:
    """Starts roomless sessions for a user's agent, drives tools, closes and checks them."""

    def __init__(self, *, drain_timeout: float, close_timeout: float, layer: bool) -> None:
        self.drain_timeout = drain_timeout
        self.close_timeout = close_timeout
        self.layer = layer
        self.ledger = ProviderLedger()
        self._closes: dict[int, list[Any]] = {}
        self._sessions: list[Any] = []

    async def start(
        self,
        agent: Any,
        *,
        stt: Any = None,
        llm: Any = None,
        tts: Any = None,
        vad: Any = None,
        **session_kwargs: Any,
    ) -> Any:
        """A started roomless ``AgentSession`` for ``agent``: the fault fakes (or your own
        plugins), the real Silero VAD, a quiet caller and an instant audio sink."""
        from livekit.agents import AgentSession

        for key, value in transcript_kwargs(0.3).items():
            session_kwargs.setdefault(key, value)
        session: Any = AgentSession(
            stt=stt if stt is not None else FakeSTT(self.ledger),
            llm=llm if llm is not None else FakeLLM(self.ledger),
            tts=tts if tts is not None else FakeTTS(self.ledger),
            vad=vad if vad is not None else load_vad(),
            **session_kwargs,
        )
        session.input.audio = SilenceInput()
        session.output.audio = FastAudioOutput()
        closes: list[Any] = []
        self._closes[id(session)] = closes
        session.on("close", closes.append)
        self._sessions.append(session)
        await session.start(agent)
        return session

    async def call_tool(
        self, session: Any, name: str, arguments: dict[str, Any] | None = None, *, wait: float = 5.0
    ) -> None:
        """Drive a turn in which the (fake) LLM calls ``name``; returns once it runs."""
        model = session.llm
        if not isinstance(model, FakeLLM):
            raise TypeError("call_tool() scripts the fake LLM; pass no llm= to start()")
        model.script.append(FakeReply(tool_calls=[(name, arguments or {})]))
        session.generate_reply(user_input=f"please call {name}")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            act = session._activity
            if act is not None and any(tool == name for tool, _ in running_tools(act)):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"tool {name!r} did not start within {wait} s")

    async def close(self, session: Any, path: ClosePath = "aclose") -> None:
        """Close ``session`` along one close path and wait for the close to end."""
        from livekit.agents.voice.events import CloseReason

        if path == "aclose":
            await session.aclose()
            return
        closes = self._closes[id(session)]
        if path in ("shutdown", "graceful"):
            session.shutdown(drain=path == "graceful")
        elif path == "disconnect":
            session._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
        else:
            raise ValueError(f"unsupported close path {path!r}")
        while not closes:
            await asyncio.sleep(0.01)
        close = closing_of(session, live_only=False)
        if close is not None and close.task is not None:
            await asyncio.wait({close.task})

    async def assert_closes_cleanly(
        self,
        session: Any,
        *,
        path: ClosePath = "aclose",
        within: float | None = None,
        allow_forced: bool = True,
    ) -> None:
        """Close and fail, with the close report and the audit, unless the close returned
        within ``within`` (default: ``close_timeout`` + 0.5 s), emitted one close event,
        left no provider connection, no task, no zombie and no timer behind."""
        within = within if within is not None else self.close_timeout + 0.5
        t0 = time.monotonic()
        task = asyncio.ensure_future(self.close(session, path))
        done, _ = await asyncio.wait({task}, timeout=within)
        elapsed = time.monotonic() - t0
        problems: list[str] = []
        if not done:
            problems.append(f"the close did not return within {within:.1f} s")
            task.cancel()
        elif task.exception() is not None:
            problems.append(f"the close raised {task.exception()!r}")
        await asyncio.sleep(0)
        closes = len(self._closes.get(id(session), []))
        if done and closes != 1:
            problems.append(f"{closes} close events (expected 1)")
        if self.ledger.open_count():
            problems.append(f"{self.ledger.open_count()} provider connection(s) left open")
        report = last_close_report(session)
        if report is not None and report.forced and not allow_forced:
            problems.append("the close had to be forced")
        # a task that awaited the close (a tool calling aclose()) resumes after it and ends
        # on its own within a few loop turns: give it that, not more
        found = audit(session)
        for _ in range(20):
            if found.clean:
                break
            await asyncio.sleep(0.01)
            found = audit(session)
        if not found.clean:
            problems.append("left behind:\n" + found.describe())
        if problems:
            lines = [f"session did not close cleanly via {path} ({elapsed * 1000:.0f} ms):"]
            lines += [f"- {p}" for p in problems]
            if report is not None:
                lines.append("close report: " + report.summary())
                for st in report.stuck:
                    lines.append(f"  stuck {st.name}:")
                    lines.extend(f"      {line}" for line in st.stack)
            raise AssertionError("\n".join(lines))

    def release(self) -> None:
        self.ledger.release()
