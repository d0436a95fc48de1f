"""``EndCallTool`` (``livekit.agents.beta.tools``) with a bounded goodbye.

Upstream's tool shuts the session down only once the speech that called it is done: the
goodbye has played out. Into a caller who already hung up, the playout never ends, so the
shutdown is never requested and the job never ends (livekit/agents#5096). The wrapper lets
the goodbye run for ``graceful_timeout``; past that the session is closed by force, so the
whole end of the call is bounded by ``graceful_timeout + close_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from . import options as options_mod
from .report import logger

Method = Callable[..., Coroutine[Any, Any, Any]]


def wrap_end_call(original: Method, _options: Any) -> Method:
    """Patch-table factory for ``EndCallTool._end_call``."""

    @functools.wraps(original)
    async def _end_call(self: Any, ctx: Any) -> Any:
        result = await original(self, ctx)
        options = options_mod.for_session(ctx.session)
        if options is not None and options.graceful_timeout is not None:
            _bound_goodbye(ctx.session, ctx.speech_handle, options.graceful_timeout)
        return result

    return _end_call


def _bound_goodbye(session: Any, handle: Any, timeout: float) -> None:
    """Close ``session`` by force if ``handle`` (the goodbye) is not done within ``timeout``
    and the session has not closed by then."""
    ref = weakref.ref(session)

    def _expire() -> None:
        s = ref()
        if s is None or not s._started or handle.done():
            return
        from livekit.agents.voice.events import CloseReason

        logger.warning(
            "EndCallTool: the goodbye did not finish within graceful_timeout=%.1fs (the caller "
            "may have hung up); closing the session",
            timeout,
        )
        s._close_soon(reason=CloseReason.USER_INITIATED, drain=False)

    timer = asyncio.get_running_loop().call_later(timeout, _expire)
    handle.add_done_callback(lambda _: timer.cancel())
    session.once("close", lambda _: timer.cancel())
