"""``python -m livekit_safeclose.worker idle-report --pid PID [--interval S] [--json]``."""

from __future__ import annotations

import sys

from .idle_report import main

if __name__ == "__main__":
    sys.exit(main())
