"""The stdio MCP stand-in: a real SDK server on stdin/stdout, run as a subprocess by the
real ``MCPServerStdio``.

    python -m livekit_safeclose.testing.mcp.stdio_server --status FILE [--stubborn]

``--status``: a file the server appends one line per event to (``pid N`` first, then
``call hang``, ``cancelled hang``, ``eof`` when its stdin closed, ``sigterm``); the test
reads it through :class:`~.stdio.StdioStandin`. ``--stubborn``: a shutdown that is
ignored: the server keeps running after its stdin closes and ignores SIGTERM, so only
SIGKILL ends it (the last step of the SDK's shutdown sequence).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--status", required=True)
    parser.add_argument("--stubborn", action="store_true")
    args = parser.parse_args(argv)
    out = open(args.status, "a", buffering=1)

    def record(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def on_sigterm(_sig: int, _frame: FrameType | None) -> None:
        record("sigterm")
        if not args.stubborn:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    record(f"pid {os.getpid()}")
    from ._sdk import build_server

    try:
        build_server(record).run("stdio")
    except BaseException as exc:  # the SDK's run ends with stdin (or raises on a broken pipe)
        record(f"run ended: {type(exc).__name__}")
    record("eof")
    if not args.stubborn:
        # a healthy server ends as its stdin closes (interpreter shutdown would wait on the
        # SDK's stdin reader thread for a second or two)
        out.close()
        os._exit(0)
    while True:  # a server that ignores its stdin closing; SIGTERM is ignored too
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
