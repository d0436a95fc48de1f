"""The user-facing harness: open-stream ledger, post-close audit, the pytest plugin."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

import livekit_safeclose as lsc
from livekit_safeclose.testing.fakes import FakeReply
from livekit_safeclose.testing.scenarios import Ctx, ScenarioAgent, make_session, run_scenario

pytest_plugins = ["pytester"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_ledger_counts_live_streams_and_returns_to_zero() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    ctx = Ctx()
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx))
    for _ in range(100):  # the STT stream opens once the recognition pump runs
        if lsc.open_streams(session)["stt"]:
            break
        await asyncio.sleep(0.01)
    assert lsc.open_streams(session)["stt"] == 1
    assert lsc.open_streams()["stt"] >= 1
    await session.aclose()
    assert lsc.open_streams(session) == {"stt": 0, "tts": 0, "llm": 0, "realtime": 0, "total": 0}
    for sid in ("tool-park-aclose", "tts-stall-aclose", "llm-stall-aclose", "stt-close-hang-aclose"):
        out = await run_scenario(sid, patched=True)
        assert out.streams_open == 0
        assert lsc.open_streams()["total"] == 0, sid


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_audit_of_a_clean_close_is_clean() -> None:
    lsc.install()
    ctx = Ctx()
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx))
    await session.aclose()
    found = lsc.audit(session)
    assert found.clean, found.describe()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_audit_lists_zombies_with_their_stack() -> None:
    lsc.install(drain_timeout=0.3, close_timeout=2.0)
    ctx = Ctx()
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx, tool="swallow"))
    session.generate_reply(user_input="go")
    await asyncio.wait_for(ctx.engaged.wait(), 5)
    await session.aclose()
    found = lsc.audit(session)
    assert ctx.ledger.open_count() == 0  # the streams closed even so
    zombie = [z for z in found.zombies if z.name.startswith("tool_exec_lookup")]
    assert zombie and zombie[0].swallowed_cancel
    assert any("in park" in line for line in zombie[0].stack)
    assert "zombies (swallowed cancellation)" in found.describe()
    ctx.ledger.release()
    await asyncio.sleep(0.05)
    assert not [z for z in lsc.audit(session).zombies if z.name.startswith("tool_exec_lookup")]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_tool_that_awaited_aclose_leaves_no_timer_behind() -> None:
    """The tool resumes after the close and ends; upstream then arms the user-away timer
    on the closed session (15 s of a pinned session and a wake-up). The layer disarms it."""
    lsc.install(drain_timeout=0.5, close_timeout=2.0)
    ctx = Ctx()
    ctx.script = [FakeReply(tool_calls=[("lookup", {})])]
    session = ctx.session = make_session(ctx)
    await session.start(ScenarioAgent(ctx, tool="aclose"))
    session.generate_reply(user_input="hang up")
    await asyncio.wait_for(ctx.tool_finished.wait(), 5)
    await asyncio.sleep(0.2)
    found = lsc.audit(session)
    assert found.clean, found.describe()


USER_AGENT = textwrap.dedent(
    """
    import asyncio
    from livekit.agents import Agent, RunContext, function_tool


    class BookingAgent(Agent):
        def __init__(self) -> None:
            super().__init__(instructions="Book tables.")

        @function_tool
        async def book_table(self, context: RunContext, party: int) -> str:
            \"\"\"Book a table.\"\"\"
            await asyncio.Event().wait()  # the booking API never answers
            return "booked"

        @function_tool
        async def stubborn(self, context: RunContext) -> str:
            \"\"\"Insists on finishing a 4 s operation, ignoring cancellation (a bug).\"\"\"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 4.0
            while loop.time() < deadline:
                try:
                    await asyncio.sleep(deadline - loop.time())
                except asyncio.CancelledError:
                    pass
            return "done"
    """
)

USER_TESTS = textwrap.dedent(
    """
    import pytest
    from my_agent import BookingAgent


    @pytest.mark.asyncio
    @pytest.mark.timeout(30)
    @pytest.mark.safeclose(drain_timeout=0.3, close_timeout=2.0)
    @pytest.mark.parametrize("path", ["aclose", "shutdown", "disconnect"])
    async def test_booking_closes_cleanly(safeclose, path):
        session = await safeclose.start(BookingAgent())
        await safeclose.call_tool(session, "book_table", {"party": 4})
        await safeclose.assert_closes_cleanly(session, path=path)


    @pytest.mark.asyncio
    @pytest.mark.timeout(30)
    @pytest.mark.safeclose(drain_timeout=0.3, close_timeout=2.0)
    async def test_stubborn_tool_is_caught(safeclose):
        session = await safeclose.start(BookingAgent())
        await safeclose.call_tool(session, "stubborn")
        await safeclose.assert_closes_cleanly(session)


    @pytest.mark.asyncio
    @pytest.mark.timeout(30)
    @pytest.mark.safeclose(layer=False)
    async def test_vanilla_does_not_close(safeclose):
        session = await safeclose.start(BookingAgent())
        await safeclose.call_tool(session, "book_table", {"party": 2})
        with pytest.raises(AssertionError, match="did not return within 1.0 s"):
            await safeclose.assert_closes_cleanly(session, within=1.0)


    def test_unrelated_suites_are_untouched():
        import livekit_safeclose
        assert not livekit_safeclose.is_installed()
    """
)


@pytest.mark.timeout(180)
def test_plugin_on_a_user_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(my_agent=USER_AGENT, test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=5, failed=1)
    out = result.stdout.str()
    # the failing case shows where the stuck tool was parked
    assert "test_stubborn_tool_is_caught" in out
    assert "zombies (swallowed cancellation)" in out
    assert "my_agent.py" in out and "in stubborn" in out


def test_plugin_is_registered_but_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="def test_plain():\n    import sys\n    assert 'livekit.agents' not in sys.modules\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--markers")
    assert "@pytest.mark.safeclose" in result.stdout.str()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)
