"""``python -m livekit_safeclose check``."""

from .cli import main

raise SystemExit(main())
