"""Toolsets and MCP servers in a bounded close.

Upstream (livekit-agents 1.8.x with the ``mcp`` SDK 2.x) keeps an MCP-equipped session from
closing bounded and complete three ways:

* an ``AsyncToolset`` (``MCPToolset`` is one) runs its tool calls on its own tool executor,
  which a forced close of the activity never cancels; ``MCPToolset.aclose()`` drains that
  executor first, waiting for a (non-cancellable) call that never answers, so
  ``MCPServer.aclose()`` is never reached;
* ``MCPServer.aclose()`` awaits the MCP client task without a bound, and cancelling its
  caller (the close abandoning a step) cancels that task: the SDK's own shielded shutdown
  (stdio: close stdin, wait, SIGTERM, wait, SIGKILL) is cut half-way, and a server that
  ignores its stdin closing outlives the close with the SDK's tasks parked on its pipes;
* that sequence takes about 4 s for such a server, longer than a close bound.

The layer, instead:

* a forced close cancels the calls running on the executors of every toolset the session
  reaches (:func:`tool_tasks`): at the drain bound with the speech that waits on them, and
  before the activity's ``aclose`` with its own tools; each toolset's ``aclose`` then goes
  on to its MCP server;
* while its session closes, ``MCPServer.aclose()`` runs upstream's body in a task of its own
  that no cancellation of the caller reaches (:func:`wrap_server_aclose`), bounded by
  :data:`SHUTDOWN_ALLOWANCE` inside the phase's bound: a stdio server still running near
  that end is sent SIGTERM, then SIGKILL (its process group, as the SDK would), so the SDK
  sees it exit and completes its own sequence; an HTTP server that does not answer gets its
  HTTP client closed, so the SDK's requests fail at once and its sequence completes too;
* the finisher (:func:`finish`) shuts down the session's servers whose ``aclose`` was never
  reached, waits for the shutdowns in flight and, last, cancels an MCP client task whose
  server is gone.

The stdio server's process is found by the wrapper of the SDK's spawn
(:func:`wrap_spawn`): it notes the process against the task that spawned it, which is the
server's client task. Nothing here imports the ``mcp`` SDK (seconds of CPU): a session
can only hold MCP servers once ``livekit.agents.llm.mcp`` is imported, and both patch rows
wait for that import (``if_imported``; ``AgentSession.start`` catches up).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from .bounded_close import BoundedClose, closing_of
from .ownership import activities_of, noted_sessions

Method = Callable[..., Coroutine[Any, Any, Any]]

#: the longest one MCP server's shutdown may take inside a close (the SDK's own sequence,
#: then the escalation): the teardown steps after the models get 1 s together
SHUTDOWN_ALLOWANCE = 0.8
#: between SIGTERM and SIGKILL to a stdio server that did not exit on its stdin closing
TERM_GRACE = 0.2
#: after the last escalation, for the SDK to see the server gone and release its tasks
EXIT_NOTICE = 0.15
#: kept between a shutdown's end and the bound of the phase it runs in
PHASE_RESERVE = 0.1
_POLL = 0.01
_SIGKILL: int = getattr(signal, "SIGKILL", signal.SIGTERM)
_MCP_MODULE = "livekit.agents.llm.mcp"

#: the stdio server process each MCP client task spawned
_children: weakref.WeakKeyDictionary[asyncio.Task[Any], Any] = weakref.WeakKeyDictionary()
#: per MCP server, its bounded shutdown (the one in flight, or the last one)
_shutdowns: weakref.WeakKeyDictionary[Any, asyncio.Task[None]] = weakref.WeakKeyDictionary()


# -- what a session reaches ----------------------------------------------------------------
@functools.cache
def _toolset_classes() -> tuple[Any, Any]:
    """``(Toolset, AsyncToolset or None)``, imported once: every forced close asks."""
    from livekit.agents import llm

    try:
        from livekit.agents.llm.async_toolset import AsyncToolset
    except ImportError:  # a release without session-scoped toolsets
        return llm.Toolset, None
    return llm.Toolset, AsyncToolset


def _walk(tools: Iterable[Any], found: dict[int, Any], toolset: Any) -> None:
    for tool in tools:
        if isinstance(tool, toolset) and id(tool) not in found:
            found[id(tool)] = tool
            _walk(tool.tools, found, toolset)


def toolsets_of(session: Any, activities: Iterable[Any]) -> list[Any]:
    """The toolsets (nested ones included) of the session, of the activities' agents, and
    the ones the activities built for the agents' ``mcp_servers``."""
    toolset = _toolset_classes()[0]
    found: dict[int, Any] = {}
    _walk(session.tools, found, toolset)
    for act in activities:
        _walk(getattr(act, "_mcp_tools", ()), found, toolset)
        _walk(act.agent.tools, found, toolset)
    return list(found.values())


def _executors(toolsets: Iterable[Any]) -> list[Any]:
    async_toolset = _toolset_classes()[1]
    if async_toolset is None:
        return []
    return [ts._executor for ts in toolsets if isinstance(ts, async_toolset)]


def _toolset_executors(activity: Any) -> list[Any]:
    return _executors(toolsets_of(activity._session, [activity]))


def tool_tasks(activity: Any) -> list[asyncio.Task[Any]]:
    """The tool calls running on the toolsets' own executors: what a forced close of
    ``activity`` must cancel besides the activity's own tools."""
    return [rt.exe_task for ex in _toolset_executors(activity) for rt in list(ex._running_tasks.values())]


def forget(activity: Any, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Take ``tasks`` (zombies) out of the toolsets' executors, so a toolset's ``aclose``
    does not wait on them before it closes its MCP server."""
    drop = set(tasks)
    if not drop:
        return
    for ex in _toolset_executors(activity):
        for call_id, running in list(ex._running_tasks.items()):
            if running.exe_task in drop:
                ex._running_tasks.pop(call_id, None)


def servers_of(session: Any, activities: Iterable[Any]) -> list[Any]:
    """The MCP servers of the session's toolsets (and of the deprecated ``mcp_servers``)."""
    mcp = sys.modules.get(_MCP_MODULE)
    if mcp is None:
        return []
    acts = list(activities)
    found = [ts._mcp_server for ts in toolsets_of(session, acts) if isinstance(ts, mcp.MCPToolset)]
    for holder in [session, *(act.agent for act in acts)]:
        listed = getattr(holder, "mcp_servers", None)
        found += listed if isinstance(listed, list) else []
    unique: dict[int, Any] = {}
    for server in found:
        if isinstance(server, mcp.MCPServer):
            unique.setdefault(id(server), server)
    return list(unique.values())


def _session_servers(session: Any, close: BoundedClose) -> list[Any]:
    if _MCP_MODULE not in sys.modules:
        return []  # no MCP server can exist before the module is imported: asked every close
    return servers_of(session, [*close.activities, *activities_of(session)])


def _close_of(server: Any) -> BoundedClose | None:
    """The bounded close in flight of a session this server belongs to."""
    for session in noted_sessions():
        close = closing_of(session)
        if close is not None and any(s is server for s in _session_servers(session, close)):
            return close
    return None


def _running(server: Any) -> bool:
    task = server._client_task
    return task is not None and not task.done()


def _child_of(server: Any) -> tuple[Any, bool]:
    """(the stdio server's process, or ``None``; whether the server runs on stdio)."""
    client = server._client_task
    child = _children.get(client) if client is not None else None
    mcp = sys.modules.get(_MCP_MODULE)
    return child, child is not None or (mcp is not None and isinstance(server, mcp.MCPServerStdio))


# -- the stdio server's process --------------------------------------------------------------
def wrap_spawn(original: Method, _options: Any) -> Method:
    """Patch-table factory for the SDK's stdio spawn: the process is noted against the MCP
    client task that spawned it (and nothing is awaited after the spawn, as the SDK asks)."""

    @functools.wraps(original)
    async def spawn(*args: Any, **kwargs: Any) -> Any:
        process = await original(*args, **kwargs)
        task = asyncio.current_task()
        if task is not None:
            _children[task] = process
        return process

    return spawn


def _exited(process: Any) -> bool:
    return process.returncode is not None


def _signal(process: Any, sig: int) -> None:
    """Signal the server's process group (the SDK starts it as a session leader), or the
    process alone where it is not one; never a process that was already reaped."""
    if _exited(process):
        return
    pid = process.pid
    try:
        if hasattr(os, "killpg") and os.getpgid(pid) == pid != os.getpgid(0):
            os.killpg(pid, sig)
        elif sig == _SIGKILL:
            process.kill()
        else:
            process.terminate()
    except (ProcessLookupError, PermissionError):
        pass


async def _wait_exit(process: Any, deadline: float) -> bool:
    while not _exited(process):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def _end_child(process: Any, end: float) -> str:
    """SIGTERM, then SIGKILL what did not exit; what the layer had to do."""
    if _exited(process):
        return "the server exited"
    _signal(process, signal.SIGTERM)
    if await _wait_exit(process, end - EXIT_NOTICE):
        return "terminated (SIGTERM)"
    _signal(process, _SIGKILL)
    await _wait_exit(process, end)
    return "killed (SIGKILL)"


async def _end_connection(server: Any, client: asyncio.Task[Any] | None, end: float) -> str:
    """An HTTP server that does not answer: its HTTP client is closed, so every request of
    the SDK's shutdown (the session ``DELETE``) fails at once and the SDK finishes its own
    sequence. Cancelling the client task instead would land wherever it is: a cancel taken
    by the MCP session's exit leaves the ``DELETE`` after it waiting unbounded."""
    http = getattr(server, "_http_client", None)
    if http is not None:
        closing = asyncio.ensure_future(http.aclose())
        closing.add_done_callback(_retrieve)
        await asyncio.wait({closing}, timeout=max(0.0, end - time.monotonic()))
        return "HTTP client closed"
    if client is not None:  # a transport of its own: nothing else to reach
        client.cancel()
    return "client cancelled"


# -- MCPServer.aclose in a close ---------------------------------------------------------------
def wrap_server_aclose(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``MCPServer.aclose``: untouched unless its session is closing;
    then the shutdown runs bounded in its own task, awaited shielded."""

    @functools.wraps(original)
    async def aclose(self: Any) -> None:
        close = _close_of(self)
        if close is None:
            await original(self)
            return
        await asyncio.shield(shutdown(self, close, original))

    return aclose


def shutdown(server: Any, close: BoundedClose, upstream: Method | None = None) -> asyncio.Task[None]:
    """The server's bounded shutdown in this close (started once)."""
    task = _shutdowns.get(server)
    if task is None or task.done():
        body = upstream if upstream is not None else inspect.unwrap(type(server).aclose)
        task = asyncio.ensure_future(_bounded_shutdown(server, close, body))
        task.add_done_callback(_retrieve)
        _shutdowns[server] = task
    return task


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _deadline(close: BoundedClose, now: float) -> float:
    return max(now, min(close.phase_deadline() - PHASE_RESERVE, now + SHUTDOWN_ALLOWANCE))


async def _bounded_shutdown(server: Any, close: BoundedClose, upstream: Method) -> None:
    """Upstream's ``aclose`` (the SDK's own shutdown) until near the end, then the
    escalation: the stdio server's process ended, or the HTTP connections closed."""
    start = time.monotonic()
    end = _deadline(close, start)
    client = server._client_task
    child, stdio = _child_of(server)
    inner = asyncio.ensure_future(upstream(server))
    inner.add_done_callback(_retrieve)
    name = f"mcp.{type(server).__name__}.aclose"
    reserve = TERM_GRACE + EXIT_NOTICE if child is not None else EXIT_NOTICE
    if await close.wait_until(inner, end - reserve):
        exc = None if inner.cancelled() else inner.exception()
        close.record(name, start, *(("error", f"{type(exc).__name__}: {exc}") if exc else ("done", "")))
        return
    if child is not None:
        detail = await _end_child(child, end)
    elif stdio:
        # spawned before the layer could note it: a cancel would cut the SDK's sequence
        detail = "the stdio server's process is unknown: left to the SDK's own shutdown"
    else:
        detail = await _end_connection(server, client, end)
    if not await close.wait_until(inner, max(end, time.monotonic() + EXIT_NOTICE)):
        close.note_stuck(inner)
        detail += "; the client task did not end"
    close.record(name, start, "timeout", detail)


# -- the end of the close ------------------------------------------------------------------------
def finish(session: Any, close: BoundedClose) -> Coroutine[Any, Any, None] | None:
    """Completion hook (``completion.FINISHERS``): every MCP server of the session is shut
    down, bounded, even one whose toolset's ``aclose`` was never reached; an MCP client task
    still running once its server is gone (its child exited, or its connections closed) is
    cancelled. ``None`` when the session runs no MCP server."""
    servers = [s for s in _session_servers(session, close) if _running(s)]
    return _shut_down_servers(close, servers) if servers else None


async def _shut_down_servers(close: BoundedClose, servers: list[Any]) -> None:
    tasks = {s: shutdown(s, close) for s in servers}
    await asyncio.wait(tasks.values(), timeout=close.left(close.inner_deadline()))
    left = []
    for server, task in tasks.items():
        client = server._client_task
        child, stdio = _child_of(server)
        gone = _exited(child) if child is not None else not stdio  # HTTP: its client was closed
        if task.done() and client is not None and not client.done() and gone:
            left.append(client)
    if left:
        await close.settle("mcp.client_tasks.cancel", left)
