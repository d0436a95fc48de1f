"""``livekit-safeclose upstream diff|verify``: the diff generates on the installed release,
carries no import of the layer, applies to a copy that imports; the options; the refusal
of an unsupported shape; a verify run on a small subset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from livekit_safeclose import cli
from livekit_safeclose.upstream import apply as apply_mod
from livekit_safeclose.upstream import generate as gen
from livekit_safeclose.upstream.verify import patched_copy


def _added(diff: str) -> list[str]:
    return [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]


def test_diff_generates_and_never_imports_the_layer() -> None:
    patched = gen.generate(with_tests=True)
    diff = patched.diff()
    assert "+++ b/livekit-agents/livekit/agents/voice/_bounded_close.py" in diff
    assert "+++ b/tests/test_bounded_close.py" in diff
    assert "+++ b/tests/test_bounded_close_handover.py" in diff
    assert not [ln for ln in _added(diff) if "livekit_safeclose" in ln]
    for t in gen.TARGETS:  # each target wrapped: upstream's body kept under the new name
        assert f"def {gen.unbounded_name(t.method)}(" in patched.files[gen.REPO_PREFIX + t.file][1]


def test_diff_is_well_under_the_layers_size() -> None:
    added = sum(a for p, a, _ in gen.generate().stat())
    pkg = Path(cli.__file__).parent
    layer = sum(
        len(p.read_text().splitlines())
        for p in pkg.rglob("*.py")
        if not {"testing", "upstream"} & set(p.relative_to(pkg).parts)
    )
    assert added < layer / 5, (added, layer)


def test_diff_applies_to_a_copy_that_imports(tmp_path: Path) -> None:
    root = patched_copy(gen.generate(), tmp_path)
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import livekit.agents, livekit.agents.voice._bounded_close as h; print(livekit.agents.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(tmp_path))


def test_apply_refuses_a_mismatched_context(tmp_path: Path) -> None:
    patched = gen.generate()
    dest = tmp_path / "livekit" / "agents"
    shutil.copytree(gen.agents_root() / "voice", dest / "voice", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(gen.agents_root() / "beta", dest / "beta", ignore=shutil.ignore_patterns("__pycache__"))
    session_py = dest / "voice" / "agent_session.py"
    session_py.write_text(
        session_py.read_text().replace("if self._closing_task:", "if self._closing_task is not None:")
    )
    with pytest.raises(apply_mod.PatchError):
        apply_mod.apply(patched.diff(), dest, strip=gen.REPO_PREFIX)


def test_stat_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["upstream", "diff", "--stat"]) == 0
    out = capsys.readouterr().out
    assert "voice/_bounded_close.py" in out and "files changed" in out
    target = tmp_path / "fix.diff"
    assert cli.main(["upstream", "diff", "--output", str(target)]) == 0
    assert target.read_text() == gen.generate().diff()


def test_describe_names_every_changed_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["upstream", "diff", "--describe"]) == 0
    out = capsys.readouterr().out
    for t in gen.TARGETS:
        assert f"`{t.cls}.{t.method}`" in out
    assert "What stays the same" in out


def _sources(tmp_path: Path, mutate: str, old: str, new: str) -> Path:
    """Only the files the generator reads, one of them changed."""
    for rel in {t.file for t in gen.TARGETS}:
        dest = tmp_path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = (gen.agents_root() / rel).read_text()
        dest.write_text(text.replace(old, new) if rel == mutate else text)
    return tmp_path


def test_refuses_a_release_without_a_target_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _sources(tmp_path, "voice/agent_activity.py", "    async def drain(", "    async def drain_all(")
    with pytest.raises(gen.UnsupportedRelease, match=r"AgentActivity\.drain"):
        gen.generate(root)
    monkeypatch.setattr(gen, "agents_root", lambda: root)
    assert cli.main(["upstream", "diff"]) == 2
    assert "not a release the upstream diff generator supports" in capsys.readouterr().err


def test_refuses_a_release_without_an_internal_the_helper_reads(tmp_path: Path) -> None:
    root = _sources(tmp_path, "voice/agent_activity.py", "self._speech_tasks", "self._speeches")
    with pytest.raises(gen.UnsupportedRelease, match="_speech_tasks"):
        gen.generate(root)


@pytest.mark.timeout(400)
def test_verify_on_a_subset(capsys: pytest.CaptureFixture[str]) -> None:
    """A vanilla hang and a control, each on vanilla and on the patched copy."""
    code = cli.main(["upstream", "verify", "--only", "tool-park-aclose,healthy-aclose"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| tool-park-aclose" in out and "fixed" in out
    assert "diff: 7 files" in out
