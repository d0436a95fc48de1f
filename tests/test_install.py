"""install()/uninstall(): idempotent, exact restore, clear refusal on bad input or shape."""

from __future__ import annotations

import math

import pytest
from livekit.agents import llm, stt, tts
from livekit.agents.voice.agent_activity import AgentActivity
from livekit.agents.voice.agent_session import AgentSession

import livekit_safeclose as lsc
from livekit_safeclose import _compat, session, streams

PATCHED = {
    AgentSession: ("_aclose_impl", "_close_soon", "_teardown_activity"),
    AgentActivity: ("aclose",),
}
STREAM_CLASSES = (stt.RecognizeStream, tts.SynthesizeStream, tts.ChunkedStream, llm.LLMStream)


def _snapshot() -> dict[tuple[type, str], object]:
    snap: dict[tuple[type, str], object] = {}
    for cls, names in PATCHED.items():
        for n in names:
            snap[(cls, n)] = cls.__dict__[n]
    for cls in STREAM_CLASSES:
        snap[(cls, "__init__")] = cls.__dict__["__init__"]
    return snap


def test_install_patches_and_uninstall_restores_exactly() -> None:
    before = _snapshot()
    assert not lsc.is_installed()
    lsc.install()
    assert lsc.is_installed()
    assert AgentSession.__dict__["_aclose_impl"] is session._aclose_impl
    assert AgentActivity.__dict__["_force_cancel_speech_tasks"] is not None
    assert all(before[k] is not v for k, v in _snapshot().items())
    lsc.uninstall()
    assert not lsc.is_installed()
    assert _snapshot() == before
    assert all(_snapshot()[k] is before[k] for k in before)
    assert "_force_cancel_speech_tasks" not in AgentActivity.__dict__
    assert not streams.installed()
    lsc.uninstall()  # a second uninstall is a no-op


def test_install_is_idempotent_and_reconfigures() -> None:
    before = _snapshot()
    lsc.install(drain_timeout=1.0, close_timeout=2.0)
    patched = _snapshot()
    lsc.install(drain_timeout=3.0, close_timeout=4.0)
    assert _snapshot() == patched  # nothing wrapped twice
    opts = lsc.installed_options()
    assert opts is not None and (opts.drain_timeout, opts.close_timeout) == (3.0, 4.0)
    lsc.uninstall()
    assert _snapshot() == before


@pytest.mark.parametrize(
    ("drain", "close", "exc"),
    [
        (-1.0, 10.0, ValueError),
        (0.0, 10.0, ValueError),
        (5.0, -2.0, ValueError),
        (math.nan, 10.0, ValueError),
        (5.0, math.inf, ValueError),
        (6.0, 5.0, ValueError),  # drain bound larger than the close bound
        ("5", 10.0, TypeError),
        (True, 10.0, TypeError),
        (None, 10.0, TypeError),
    ],
)
def test_bad_options_are_refused(drain: object, close: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        lsc.install(drain_timeout=drain, close_timeout=close)  # type: ignore[arg-type]
    assert not lsc.is_installed()


def test_close_models_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="close_models"):
        lsc.install(close_models="yes")  # type: ignore[arg-type]
    lsc.install(close_models=True)
    opts = lsc.installed_options()
    assert opts is not None and opts.close_models is True


def test_bad_options_on_reconfigure_keep_previous() -> None:
    lsc.install(drain_timeout=1.0, close_timeout=2.0)
    with pytest.raises(ValueError):
        lsc.install(drain_timeout=-1)
    opts = lsc.installed_options()
    assert opts is not None and opts.drain_timeout == 1.0


def test_unsupported_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot()
    monkeypatch.setattr(_compat, "installed_version", lambda: "1.9.0")
    with pytest.raises(lsc.IncompatibleLivekitAgents, match=r">=1\.8\.0,<1\.9"):
        lsc.install()
    assert not lsc.is_installed()
    assert _snapshot() == before


def test_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that renamed a patched internal makes install() refuse, naming it."""
    before = _snapshot()
    monkeypatch.delattr(AgentActivity, "_close_session")
    with pytest.raises(lsc.IncompatibleLivekitAgents, match=r"AgentActivity\._close_session"):
        lsc.install()
    assert not lsc.is_installed()
    assert _snapshot() == before


def test_changed_signature_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    async def _teardown_activity(self: object, *, reason: object) -> None: ...

    monkeypatch.setattr(AgentSession, "_teardown_activity", _teardown_activity)
    with pytest.raises(lsc.IncompatibleLivekitAgents, match=r"_teardown_activity\(\) parameter\(s\) drain"):
        lsc.install()


def test_missing_instance_attribute_is_named() -> None:
    class Shapeless:
        def __init__(self) -> None:
            self.other = 1

    targets = _compat._targets()
    targets["_ToolExecutor"] = Shapeless
    problems = _compat.missing(targets=targets)
    assert "_ToolExecutor._running_tasks (attribute set in __init__)" in problems


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("1.8.9", True),
        ("1.8.0", True),
        ("1.8.12rc1", True),
        ("1.7.3", False),
        ("1.9.0", False),
        ("2.0", False),
    ],
)
def test_version_range(text: str, ok: bool) -> None:
    assert _compat.version_supported(text) is ok


def test_version_parse_errors() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        _compat.parse_version("latest")
    with pytest.raises(TypeError):
        _compat.parse_version(189)  # type: ignore[arg-type]


def test_installed_release_passes_the_check() -> None:
    assert _compat.missing() == []
    _compat.check()
