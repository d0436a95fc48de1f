"""The MCP side of an end-to-end run: a real MCP stand-in for a scenario that asks for one,
its toolset on the agent or the session, and what the server side and the event loop show
once the close returned (or hung).

``MCPSeen.clean`` is the verdict the issue asks for: the stdio child has exited, the HTTP
server holds no connection, no MCP client task runs, and the loop had no wake-up
attributable to the session (or the MCP client) in the window after the close.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..loop_quiet import mcp_tasks, wakeup_window
from ..mcp import MCPStandin, MCPTransport
from .catalogue import E2EScenario

#: the quiet window measured after an MCP scenario's close (the issue's 2 s)
QUIET_WINDOW = 2.0


@dataclass
class MCPSeen:
    """What the MCP server and the loop showed after the close (see the module doc);
    ``wakeups``: every wake-up in the window, ``attributable``: those a callback of the
    session or the MCP client caused, ``top``: those callbacks by owner."""

    transport: MCPTransport
    stubborn: bool
    calls: int
    child_alive: bool
    http_open: int
    tasks: int
    wakeups: int
    attributable: int
    window_s: float
    top: dict[str, int] = field(default_factory=dict)
    task_names: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.child_alive and self.http_open == 0 and self.tasks == 0 and self.attributable == 0

    def summary(self) -> str:
        return (
            f"mcp[{self.transport}{', stubborn' if self.stubborn else ''}]: child_alive={self.child_alive} "
            f"http_open={self.http_open} mcp_tasks={self.tasks} wakeups={self.wakeups} "
            f"attributable={self.attributable} in {self.window_s:.0f} s {self.top}; tasks={self.task_names}; "
            f"events={self.events}"
        )


def start_standin(sc: E2EScenario) -> MCPStandin | None:
    """The scenario's MCP stand-in, started (``None``: the scenario has no MCP server)."""
    if sc.mcp is None:
        return None
    return MCPStandin(sc.mcp, stubborn=sc.mcp_stubborn).start()


def tools_for(sc: E2EScenario, standin: MCPStandin | None) -> tuple[list[Any], dict[str, Any]]:
    """(the agent's extra tools, the session's keyword arguments): the MCP toolset goes
    where the scenario puts it."""
    if standin is None:
        return [], {}
    toolset = standin.toolset()
    return ([], {"tools": [toolset]}) if sc.mcp_scope == "session" else ([toolset], {})


async def observe(standin: MCPStandin, owned: set[int], window: float = QUIET_WINDOW) -> MCPSeen:
    """The server's side and the loop after the close (the caller waited for it)."""
    child_alive, http_open = standin.child_alive(), standin.open_connections()
    left = mcp_tasks()
    quiet = await wakeup_window(window, owned=owned)
    return MCPSeen(
        transport=standin.transport,
        stubborn=standin.stubborn,
        calls=standin.calls(),
        child_alive=child_alive,
        http_open=http_open,
        tasks=len(left),
        wakeups=quiet.wakeups,
        attributable=quiet.attributable,
        window_s=window,
        top=quiet.top(),
        task_names=[t.get_name() for t in left],
        events=standin.events(),
    )


async def stop_standin(standin: MCPStandin | None) -> None:
    """Cleanup, bounded: the stdio child killed, the HTTP server stopped off the loop."""
    if standin is not None:
        await asyncio.to_thread(standin.stop)
