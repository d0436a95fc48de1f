"""The MCP rows of the patch table wait for the ``mcp`` extra to be imported: ``install()``
never imports the SDK (seconds of CPU in every job process that does not use MCP); a
session's ``start()`` applies them once something imported it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("mcp")

_SCRIPT = """
import sys
import livekit.agents
import livekit_safeclose as lsc
from livekit_safeclose import patching
from livekit_safeclose.patch_table import PATCHES

waiting = [r for r in PATCHES if r.if_imported]
assert waiting, "the MCP rows wait for their module"
lsc.install(worker=False)
assert "mcp" not in sys.modules and "livekit.agents.llm.mcp" not in sys.modules, "install() imported mcp"
assert not any(patching.is_applied(r) for r in waiting)

from livekit.agents.llm import mcp  # the agent file imports it after install()
import mcp.client.stdio as stdio
patching.catch_up(PATCHES)  # what AgentSession.start() does first
assert all(patching.is_applied(r) for r in waiting)
assert mcp.MCPServer.aclose.__wrapped__ is not None
assert stdio._create_platform_compatible_process.__wrapped__ is not None
lsc.uninstall()
assert not hasattr(mcp.MCPServer.aclose, "__wrapped__")
assert not hasattr(stdio._create_platform_compatible_process, "__wrapped__")
patching.catch_up(PATCHES)  # nothing installed: nothing applied
assert not any(patching.is_applied(r) for r in waiting)
print("ok")
"""


@pytest.mark.timeout(120)
def test_mcp_rows_wait_for_the_mcp_import_and_start_applies_them() -> None:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
