"""install()/uninstall(): one patch table, atomic apply, exact revert, lossless options,
clear refusal on bad input or a missing shape."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import livekit_safeclose as lsc
from livekit_safeclose import compat, patching
from livekit_safeclose.compat import Requirement
from livekit_safeclose.compat_table import REQUIREMENTS
from livekit_safeclose.options import Options
from livekit_safeclose.patch_table import PATCHES
from livekit_safeclose.patching import Patch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _start_unpatched() -> None:
    # collecting examples/ imports an agent file that calls install() at import time
    lsc.uninstall()


def _snapshot() -> dict[tuple[str, str], object]:
    """Every table target's own attribute (or absence), as upstream has it now."""
    snap: dict[tuple[str, str], object] = {}
    for row in PATCHES:
        owner = patching.resolve(row.owner)
        snap[(row.owner, row.attribute)] = vars(owner).get(row.attribute, patching.ABSENT)
    return snap


def test_install_applies_every_row_and_uninstall_restores_exactly() -> None:
    before = _snapshot()
    lsc.install()
    after = _snapshot()
    assert lsc.is_installed()
    assert {"core", "stream_ledger", "signal_guard", "drain_availability"} <= lsc.installed_parts()
    for row in PATCHES:
        if patching.is_applied(row):
            new = after[(row.owner, row.attribute)]
            assert new is not before[(row.owner, row.attribute)], row.target
            expected = (
                None
                if before[(row.owner, row.attribute)] is patching.ABSENT
                else before[(row.owner, row.attribute)]
            )
            wrapped = getattr(new, "__wrapped__", "missing")
            # an inherited attribute is wrapped as found on the owner
            assert wrapped is expected or expected is None, row.target
    lsc.uninstall()
    assert not lsc.is_installed() and lsc.installed_parts() == set()
    restored = _snapshot()
    assert all(restored[k] is before[k] for k in before)
    lsc.uninstall()  # a second uninstall is a no-op


def test_install_is_idempotent_and_reconfigures_losslessly() -> None:
    lsc.install(drain_timeout=1.0, close_timeout=2.0)
    patched = _snapshot()
    lsc.install(drain_timeout=3.0, close_timeout=4.0, close_models=True, reject_late_accepts=False)
    again = _snapshot()
    for row in PATCHES:  # nothing wrapped twice: a refresh row is remade around the original
        key = (row.owner, row.attribute)
        if row.refresh:
            assert getattr(again[key], "__wrapped__", None) is getattr(patched[key], "__wrapped__", None), (
                row.target
            )
        else:
            assert again[key] is patched[key], row.target
    opts = lsc.installed_options()
    assert opts == Options(drain_timeout=3.0, close_timeout=4.0, close_models=True, reject_late_accepts=False)
    assert opts is not None
    lsc.install(**opts.as_dict())
    assert lsc.installed_options() == opts


def test_worker_false_reverts_the_worker_rows() -> None:
    lsc.install()
    assert "signal_guard" in lsc.installed_parts()
    lsc.install(worker=False)
    assert lsc.installed_parts() == {"core", "stream_ledger"}
    opts = lsc.installed_options()
    assert opts is not None and opts.worker is False


def test_apply_is_atomic() -> None:
    """A row failing half-way leaves every earlier row reverted."""
    before = _snapshot()
    bad = Patch(frozenset({"core"}), "livekit.agents.voice.agent_session:AgentSession", "aclose",
                "tests.test_install:_no_wrapped_factory", "broken on purpose")  # fmt: skip
    with pytest.raises(TypeError, match="__wrapped__"):
        patching.apply((*PATCHES[:3], bad), {"core"}, Options())
    assert _snapshot() == before
    assert patching.applied_parts() == set()


def _no_wrapped_factory(original: Any, _options: Any) -> Any:
    async def aclose(self: Any) -> None: ...

    return aclose


def test_revert_deletes_attributes_that_were_new() -> None:
    holder = types.ModuleType("safeclose_test_holder")
    holder.Thing = type("Thing", (), {})  # type: ignore[attr-defined]
    sys.modules["safeclose_test_holder"] = holder
    try:
        row = Patch(frozenset({"core"}), "safeclose_test_holder:Thing", "added",
                    "tests.test_install:_new_attribute_factory", "new on purpose")  # fmt: skip
        patching.apply((row,), {"core"}, Options())
        assert holder.Thing.added.__wrapped__ is None  # type: ignore[attr-defined]
        patching.revert_all()
        assert "added" not in vars(holder.Thing)  # type: ignore[attr-defined]
    finally:
        del sys.modules["safeclose_test_holder"]


def _new_attribute_factory(original: Any, _options: Any) -> Any:
    assert original is patching.ABSENT

    def added() -> None: ...

    added.__wrapped__ = None  # type: ignore[attr-defined]
    return added


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
    before = _snapshot()
    with pytest.raises(exc):
        lsc.install(drain_timeout=drain, close_timeout=close)  # type: ignore[arg-type]
    assert not lsc.is_installed() and _snapshot() == before


@pytest.mark.parametrize("name", ["close_models", "worker", "signal_guard", "force_close_on_second_signal"])
def test_flags_must_be_bools(name: str) -> None:
    with pytest.raises(TypeError, match=name):
        lsc.install(**{name: "yes"})  # type: ignore[arg-type]


def test_bad_options_on_reconfigure_keep_previous() -> None:
    lsc.install(drain_timeout=1.0, close_timeout=2.0)
    with pytest.raises(ValueError):
        lsc.install(drain_timeout=-1)
    opts = lsc.installed_options()
    assert opts is not None and opts.drain_timeout == 1.0


def test_untested_release_with_matching_shapes_runs_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(compat, "installed_version", lambda: "1.9.7")
    with caplog.at_level(logging.WARNING, logger="livekit.agents.safeclose"):
        lsc.install()
        lsc.install()
    assert lsc.is_installed()
    warned = [r for r in caplog.records if "not tested" in r.getMessage()]
    assert len(warned) == 1 and compat.TESTED_RANGE in warned[0].getMessage()


def test_missing_internal_is_named_and_nothing_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    from livekit.agents.voice.agent_activity import AgentActivity

    before = _snapshot()
    monkeypatch.delattr(AgentActivity, "_add_drain_blocked_tasks")
    with pytest.raises(lsc.IncompatibleLivekitAgents, match=r"AgentActivity\._add_drain_blocked_tasks"):
        lsc.install()
    assert not lsc.is_installed() and _snapshot() == before


def test_changed_signature_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from livekit.agents.voice.agent_session import AgentSession

    async def _aclose_impl(self: object, *, reason: object) -> None: ...

    monkeypatch.setattr(AgentSession, "_aclose_impl", _aclose_impl)
    with pytest.raises(lsc.IncompatibleLivekitAgents, match=r"_aclose_impl\(\) parameter\(s\) drain, error"):
        lsc.install()


def test_a_worker_part_missing_its_shape_is_refused_by_name_while_the_rest_installs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from livekit.agents.job import JobRequest

    async def accept(self: object) -> None: ...

    def reject(self: object) -> None: ...  # no terminate= any more

    monkeypatch.setattr(JobRequest, "reject", reject)
    with caplog.at_level(logging.WARNING, logger="livekit.agents.safeclose"):
        lsc.install()
    assert "drain_availability" not in lsc.installed_parts()
    assert {"core", "stream_ledger", "signal_guard"} <= lsc.installed_parts()
    assert any("drain_availability" in r.getMessage() and "reject" in r.getMessage() for r in caplog.records)


def test_stand_in_module_shape_names_what_is_missing() -> None:
    """Checked against a module shaped like an older release: every kind of requirement
    names exactly what is missing."""
    shape = types.ModuleType("safeclose_fake_release")

    class Session:
        def __init__(self) -> None:
            self._lock = None

        async def _aclose_impl(self, *, reason: object) -> None: ...

    def _run_worker() -> None:
        def _force_exit() -> None: ...

    shape.Session = Session  # type: ignore[attr-defined]
    shape._run_worker = _run_worker  # type: ignore[attr-defined]
    sys.modules["safeclose_fake_release"] = shape
    try:
        table = (
            Requirement(
                "core", "safeclose_fake_release:Session", "_aclose_impl", "method", ("reason", "drain")
            ),
            Requirement("core", "safeclose_fake_release:Session", "_closing_task", "init_attr"),
            Requirement("core", "safeclose_fake_release:Session", "_lock", "init_attr"),
            Requirement("core", "safeclose_fake_release:Missing", "x", "attr"),
            Requirement(
                "core", "safeclose_fake_release:_run_worker", "_force_exit", "closure", ("escalating",)
            ),
            Requirement("core", "safeclose_fake_release:Session", "_optional", "attr", optional=True),
        )
        found = compat.problems({"core"}, table)["core"]
        assert found == [
            "Session._aclose_impl() parameter(s) drain",
            "Session._closing_task (attribute set in __init__)",
            "safeclose_fake_release.Missing (not found)",
            "_run_worker.<locals>._force_exit (closing over escalating)",
        ]
        with pytest.raises(lsc.IncompatibleLivekitAgents, match=r"_closing_task"):
            compat.check(("core",), table=table)
    finally:
        del sys.modules["safeclose_fake_release"]


def test_installed_release_meets_every_requirement() -> None:
    """Every plain row is met, and every difference between releases has the newest form
    here (the other forms' rows name internals this release no longer has)."""
    plain = [r for r in REQUIREMENTS if r.shape is None]
    assert {r.where: compat.problem(r) for r in plain if compat.problem(r)} == {}
    assert compat.problems({r.part for r in REQUIREMENTS}) == {}
    assert compat.detect_shapes() == {
        "tool_registry": "executor",
        "drain_blocked": "set",
        "recognition_close": "private",
        "first_activity": "update_activity_task",
    }


def _release_with_forms(*, new: bool) -> types.ModuleType:
    """A module shaped like a newer (``new``) or an older release of one internal."""
    shape = types.ModuleType("safeclose_fake_forms")

    class Recognition:
        if new:

            async def _aclose(self) -> None: ...

        else:

            async def aclose(self) -> None: ...

    shape.Recognition = Recognition  # type: ignore[attr-defined]
    return shape


_FORMS = (
    Requirement("core", "safeclose_fake_forms:Recognition", "_aclose", "method", shape="close:private"),
    Requirement("core", "safeclose_fake_forms:Recognition", "aclose", "method", shape="close:public"),
)


@pytest.mark.parametrize(("new", "form"), [(True, "private"), (False, "public")])
def test_a_difference_is_met_by_any_complete_form(new: bool, form: str) -> None:
    sys.modules["safeclose_fake_forms"] = _release_with_forms(new=new)
    try:
        assert compat.problems({"core"}, _FORMS) == {}
        assert compat.detect_shapes(_FORMS) == {"close": form}
    finally:
        del sys.modules["safeclose_fake_forms"]


def test_a_difference_with_no_complete_form_names_what_each_form_lacks() -> None:
    sys.modules["safeclose_fake_forms"] = types.ModuleType("safeclose_fake_forms")
    sys.modules["safeclose_fake_forms"].Recognition = type("Recognition", (), {})  # type: ignore[attr-defined]
    try:
        assert compat.problems({"core"}, _FORMS) == {
            "core": [
                "close: none of its forms is complete (private lacks Recognition._aclose(); "
                "public lacks Recognition.aclose())"
            ]
        }
        assert compat.detect_shapes(_FORMS) == {"close": None}
        with pytest.raises(lsc.IncompatibleLivekitAgents, match=r"none of its forms"):
            compat.check(("core",), table=_FORMS)
    finally:
        del sys.modules["safeclose_fake_forms"]


def test_a_row_for_one_form_is_applied_only_where_the_release_has_that_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The list-form drain-blocked wrapper exists for releases before 1.6.1; on this one
    (``set`` form) ``install()`` leaves ``_pause_scheduling_task`` alone, and a release
    detected as ``list`` gets it."""
    from livekit.agents.voice.agent_activity import AgentActivity

    row = next(r for r in PATCHES if r.shape == "drain_blocked:list")
    original = AgentActivity.__dict__["_pause_scheduling_task"]
    lsc.install()
    assert not patching.is_applied(row)
    assert AgentActivity.__dict__["_pause_scheduling_task"] is original
    lsc.uninstall()
    monkeypatch.setattr(compat, "_shapes", {**compat.detect_shapes(), "drain_blocked": "list"})
    patching.apply(PATCHES, ("core",), Options(worker=False))
    try:
        assert patching.is_applied(row)
        assert AgentActivity.__dict__["_pause_scheduling_task"].__wrapped__ is original
    finally:
        patching.revert_all()
    assert AgentActivity.__dict__["_pause_scheduling_task"] is original


def test_an_if_present_row_whose_method_a_release_lacks_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AgentActivity._detach_reusable_resources`` is missing on 1.5.0: ``install()`` skips
    its row there instead of failing (the version matrix found it) and installs the rest."""
    from livekit.agents.voice.agent_activity import AgentActivity

    row = next(r for r in PATCHES if r.attribute == "_detach_reusable_resources")
    assert row.if_present
    monkeypatch.delattr(AgentActivity, "_detach_reusable_resources")
    lsc.install()
    try:
        assert not patching.is_applied(row)
        assert not hasattr(AgentActivity, "_detach_reusable_resources")
        assert lsc.is_installed()
    finally:
        lsc.uninstall()


def test_every_module_imports_without_livekit_agents() -> None:
    """Importing the package or any module must not fail on another release: no module
    touches a livekit-agents internal at import time. Proven by importing each one with
    livekit.agents made unimportable."""
    modules = sorted(
        "livekit_safeclose." + ".".join(p.relative_to(ROOT / "livekit_safeclose").with_suffix("").parts)
        for p in (ROOT / "livekit_safeclose").rglob("*.py")
        if "testing" not in p.parts and p.name != "__main__.py"
    )
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'livekit.agents' or name.startswith('livekit.agents.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {[m.removesuffix('.__init__') for m in modules]!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("1.8.9", True),
        ("1.8.12rc1", True),
        ("1.5.0", True),
        ("1.7.3", True),
        ("1.4.6", False),
        ("1.9.0", False),
    ],
)
def test_tested_range(text: str, ok: bool) -> None:
    assert compat.tested(text) is ok


def test_version_parse_errors() -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        compat.parse_version("latest")
    with pytest.raises(TypeError):
        compat.parse_version(189)  # type: ignore[arg-type]


def test_readme_how_it_works_lists_exactly_the_patch_table() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## How it works", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))
    assert listed == {row.target for row in PATCHES}
