"""The upstream-style regression tests that ``upstream diff --with-tests`` adds as
``tests/test_bounded_close.py`` (kept under ``testing``: a test module imports livekit-agents
at import time)."""
