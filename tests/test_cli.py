"""``livekit-safeclose check`` end to end, on a fast subset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CMD = [sys.executable, "-m", "livekit_safeclose"]


@pytest.mark.timeout(120)
def test_check_json_shape_and_verdicts() -> None:
    proc = subprocess.run(
        [*CMD, "check", "--only", "tool-park-aclose,healthy-aclose", "--json"],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and data["livekit_agents"].startswith("1.8")
    rows = {r["scenario"]: r for r in data["scenarios"]}
    assert set(rows) == {"tool-park-aclose", "healthy-aclose"}
    stuck = rows["tool-park-aclose"]
    assert stuck["verdict"] == "fixed"
    assert stuck["vanilla"]["closed"] is False and stuck["vanilla"]["provider_open"] == 1
    assert stuck["layer"]["closed"] is True and stuck["layer"]["provider_open"] == 0
    assert stuck["layer"]["report"]["forced"] is True
    assert rows["healthy-aclose"]["verdict"] == "ok"
    # progress goes to stderr while it runs
    assert "[1/2]" in proc.stderr and "[2/2]" in proc.stderr


@pytest.mark.timeout(120)
def test_check_table() -> None:
    proc = subprocess.run(
        [*CMD, "check", "--only", "on-exit-hang-aclose"], capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| scenario") and "with layer" in lines[0]
    assert any(ln.startswith("| on-exit-hang-aclose") and "HUNG" in ln and "fixed" in ln for ln in lines)


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--drain-timeout", "5", "--close-timeout", "1"],
        ["check", "--drain-timeout", "-1"],
        ["check", "--close-timeout", "nan"],
        ["check", "--only", "no-such-scenario"],
    ],
)
def test_check_rejects_bad_input(args: list[str]) -> None:
    proc = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip()


def test_list() -> None:
    proc = subprocess.run([*CMD, "check", "--list"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "tool-park-aclose" in proc.stdout


@pytest.mark.timeout(120)
def test_check_e2e_reports_the_provider_side_count() -> None:
    """--e2e: real plugins against the stand-in servers; 'open' is the server's count."""
    proc = subprocess.run(
        [*CMD, "check", "--e2e", "--only", "tool-stuck@deepgram_stt", "--json"],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["scenarios"]
    assert row["scenario"] == "e2e:tool-stuck@deepgram_stt" and row["verdict"] == "fixed"
    assert row["vanilla"]["server_stt_open_at_close"] == 1
    assert row["layer"]["server_stt_open_after"] == 0
    assert row["layer"]["server_clean_closes"]["deepgram_stt"] == 1


@pytest.mark.timeout(120)
def test_check_e2e_runs_the_fallback_recovery_case() -> None:
    """A FallbackAdapter row: vanilla closes but leaves the recovery stream open at the
    provider that failed once; the layer leaves neither a connection nor a task."""
    proc = subprocess.run(
        [*CMD, "check", "--e2e", "--only", "stt-fallback-recovery@deepgram_stt", "--json"],
        capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["scenarios"]
    assert row["scenario"] == "e2e:stt-fallback-recovery@deepgram_stt" and row["verdict"] == "fixed"
    assert (
        row["vanilla"]["closed"]
        and row["vanilla"]["provider_open"] == 1
        and row["vanilla"]["tasks_left"] == 1
    )
    assert row["layer"]["provider_open"] == 0 and row["layer"]["tasks_left"] == 0 and row["layer"]["clean"]


def test_e2e_ids_are_derived_from_the_catalogue() -> None:
    from livekit_safeclose import cli
    from livekit_safeclose.testing.e2e import E2E_SCENARIOS

    derived = [f"{s.id}@{kind}" for s in E2E_SCENARIOS.values() for kind in s.stt_kinds]
    _, e2e_ids = cli._scenario_ids(None, e2e=True)
    assert e2e_ids == derived
    assert "tts-stall-reply@inference_stt" in e2e_ids
    assert {"tool-stuck@inference_stt", "tool-stuck@deepgram_stt"} <= set(e2e_ids)
    assert {"stt-fallback-recovery@deepgram_stt", "stt-fallback-recovery@inference_stt"} <= set(e2e_ids)
    assert {"tts-fallback-probe-on-close@inference_stt", "tts-fallback-probe-in-flight@inference_stt"} <= set(
        e2e_ids
    )


def _no_scenario_may_run(*_args: object, **_kwargs: object) -> dict[str, object]:
    raise AssertionError("a scenario subprocess was started")


@pytest.mark.parametrize(
    "argv", [["check"], ["check", "--only", "healthy-aclose", "--json"], ["check", "--e2e"]]
)
def test_check_without_the_testing_extra_says_what_to_install(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain ``pip install livekit-safeclose`` has no Silero: one line, exit 2, at once."""
    from livekit_safeclose import cli

    monkeypatch.setitem(sys.modules, "livekit.plugins.silero", None)  # the import fails
    monkeypatch.setattr(cli, "_spawn", _no_scenario_may_run)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "livekit.plugins.silero" in err[0] and 'pip install "livekit-safeclose[testing]"' in err[0]


def test_check_e2e_without_the_provider_plugins_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from livekit_safeclose import cli

    monkeypatch.setitem(sys.modules, "livekit.plugins.openai", None)
    monkeypatch.setattr(cli, "_spawn", _no_scenario_may_run)
    assert cli.main(["check", "--e2e"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "livekit.plugins.openai" in line and '"livekit-plugins-openai>=1.8.0,<1.9"' in line
    assert "[testing]" not in line  # Silero is there: only what is missing is named


def test_list_needs_no_testing_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from livekit_safeclose import cli

    monkeypatch.setitem(sys.modules, "livekit.plugins.silero", None)
    assert cli.main(["check", "--list"]) == 0
    assert "tool-park-aclose" in capsys.readouterr().out
