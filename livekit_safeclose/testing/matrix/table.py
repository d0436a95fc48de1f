"""The matrix results as Markdown: one row per release, then the evidence behind the rows.

Runs of consecutive releases with the same answer are merged (``1.5.3-1.5.17``) so the
per-class tables stay readable over 41 releases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from .verdicts import hang_class

#: the short name of each form in the release table (the newest form is not shown)
_FORM_NAMES = {
    "tool_registry": "tools",
    "drain_blocked": "drain-blocked",
    "recognition_close": "recognition close",
    "first_activity": "start()",
}
#: the forms of the newest releases: a release with these needs no adapter
CURRENT_FORMS = {
    "tool_registry": "executor",
    "drain_blocked": "set",
    "recognition_close": "private",
    "first_activity": "update_activity_task",
}


def _shows_bug(row: dict[str, Any]) -> bool:
    """Vanilla hung, or closed leaving something open."""
    return row.get("vanilla_state") in ("hangs", "leaks")


def counts(rec: dict[str, Any]) -> Counter[str]:
    """Per release: ``fixed``, ``hangs`` (vanilla shows the bug), ``no hang``, ``n/a``,
    ``FAIL``, ``ok`` (controls), ``errors``."""
    c: Counter[str] = Counter()
    for row in rec.get("scenarios", []):
        v = row["verdict"]
        c[{"no hang on vanilla": "no hang"}.get(v, v)] += 1
        if _shows_bug(row):
            c["hangs"] += 1
    c["errors"] += len(rec.get("errors", []))
    return c


def installs(rec: dict[str, Any]) -> str:
    venv, inst = rec.get("venv", {}), rec.get("install")
    if not venv.get("ok"):
        return f"no: {venv.get('error', 'not built')[:80]}"
    if inst is None:
        return "no result"
    if not inst.get("ok"):
        return f"refused: {inst.get('error', '')[:120]}"
    extra = f" (+{', '.join(venv['undeclared'])})" if venv.get("undeclared") else ""
    return "yes" + extra


def adapters(rec: dict[str, Any]) -> str:
    shapes = rec.get("install", {}).get("shapes", {})
    named = [f"{_FORM_NAMES.get(d, d)}: {f}" for d, f in shapes.items() if f != CURRENT_FORMS.get(d)]
    wait = rec.get("bounds", {}).get("transcript_wait")
    if wait is not None and wait > 0.3:
        named.append(f"transcript: fixed {wait:g} s")
    return "; ".join(named) or "-"


def worker_parts(rec: dict[str, Any]) -> str:
    inst = rec.get("install", {})
    refused = sorted(inst.get("refused", {}))
    return "all" if not refused and inst.get("ok") else ("refused: " + ", ".join(refused) if refused else "-")


def release_table(results: dict[str, Any]) -> str:
    head = "| release | installs | adapters (forms other than 1.8.9's) | fixed | hang on vanilla | no hang on vanilla | n/a | layer fails | worker parts | time |"
    lines = [head, "|" + "---|" * 10]
    for rel, rec in results["releases"].items():
        c = counts(rec)
        fails = c["FAIL"] + c["errors"] + c["vanilla control failed"] + c["error"]
        lines.append(
            f"| {rel} | {installs(rec)} | {adapters(rec)} | {c['fixed']} | {c['hangs']} | {c['no hang']} "
            f"| {c['n/a']} | {fails} | {worker_parts(rec)} | {rec.get('shard_wall_s', 0):.0f} s |"
        )
    return "\n".join(lines)


def _ranges(releases: list[str], cell: Callable[[str], str]) -> list[tuple[str, str]]:
    """``(release range, answer)`` for runs of consecutive releases with one answer."""
    out: list[tuple[str, str, str]] = []
    for rel in releases:
        answer = cell(rel)
        if out and out[-1][2] == answer:
            out[-1] = (out[-1][0], rel, answer)
        else:
            out.append((rel, rel, answer))
    return [(a if a == b else f"{a}-{b}", ans) for a, b, ans in out]


def _class_cell(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "not run"
    if all(r["verdict"] == "n/a" for r in rows):
        return "n/a"
    shown = [r for r in rows if r["verdict"] != "n/a"]
    bug = [r for r in shown if _shows_bug(r)]
    fixed = sum(r["verdict"] == "fixed" for r in shown)
    cell = f"hangs {len(bug)}/{len(shown)}, fixed {fixed}/{len(shown)}"
    closes = [r["id"] for r in shown if r.get("vanilla_state") == "closes"]
    broken = [r["id"] for r in shown if r not in bug and r["id"] not in closes]
    if closes:
        cell += " (closes on vanilla: " + ", ".join(closes) + ")"
    if broken:
        cell += " (run error: " + ", ".join(broken) + ")"
    return cell


def evidence_table(results: dict[str, Any]) -> str:
    """Per hang class: what vanilla does on each release range, and the layer's result."""
    releases = list(results["releases"])
    by: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rel, rec in results["releases"].items():
        for row in rec.get("scenarios", []):
            by.setdefault(hang_class(row["id"]), {}).setdefault(rel, []).append(row)
    lines = ["| hang class | vanilla (paths showing the bug) and layer, by release |", "|---|---|"]
    for cls, per in by.items():
        parts = _ranges(releases, lambda rel, per=per: _class_cell(per.get(rel, [])))  # type: ignore[misc]
        lines.append(f"| {cls} | " + "<br>".join(f"**{r}**: {a}" for r, a in parts) + " |")
    return "\n".join(lines)


def na_table(results: dict[str, Any]) -> str:
    releases = list(results["releases"])
    reasons: dict[str, dict[str, str]] = {}
    for rel, rec in results["releases"].items():
        for row in rec.get("scenarios", []):
            if row["verdict"] == "n/a":
                reasons.setdefault(hang_class(row["id"]), {})[rel] = row.get("reason", "")
    if not reasons:
        return "No scenario is n/a on any release run."
    lines = ["| hang class | n/a on | reason |", "|---|---|---|"]
    for cls, per in reasons.items():
        for rng, why in _ranges(releases, lambda rel, per=per: per.get(rel, "")):  # type: ignore[misc]
            if why:
                lines.append(f"| {cls} | {rng} | {why} |")
    return "\n".join(lines)


def worker_table(results: dict[str, Any]) -> str:
    releases = list(results["releases"])
    parts = sorted(
        {p for rec in results["releases"].values() for p in rec.get("install", {}).get("refused", {})}
    )
    if not parts:
        return "Every worker part installs on every release run."
    lines = ["| worker part | refused on | missing internals |", "|---|---|---|"]
    for part in parts:

        def cell(rel: str, part: str = part) -> str:
            return "; ".join(results["releases"][rel].get("install", {}).get("refused", {}).get(part, []))

        for rng, why in _ranges(releases, cell):
            if why:
                lines.append(f"| {part} | {rng} | {why} |")
    return "\n".join(lines)


def failures(results: dict[str, Any]) -> str:
    lines = []
    for rel, rec in results["releases"].items():
        for err in rec.get("errors", []):
            lines.append(f"- {rel}: {err}")
        for row in rec.get("scenarios", []):
            if row["verdict"] in ("FAIL", "vanilla control failed", "error"):
                lay = row.get("layer", {})
                lines.append(
                    f"- {rel} {row['id']}: {row['verdict']} (layer: closed={lay.get('closed')}, "
                    f"{lay.get('ms')} ms of {row.get('bound_ms')}, provider_open={lay.get('provider_open')}, "
                    f"close_events={lay.get('close_events')}, tasks_left={lay.get('tasks_left')}, "
                    f"error={lay.get('error', '')!r})"
                )
    return "\n".join(lines) or "None."


LEGEND = (
    "Each release runs in its own venv (`livekit-agents==X` and `livekit-plugins-silero==X`). "
    "*installs*: `pip install` works, `import livekit.agents` works (with what the release imports "
    "without declaring it, in brackets) and `install()` succeeds. *adapters*: the forms of the "
    "internals that differ between releases, where they are not 1.8.9's (`livekit_safeclose/adapters.py`). "
    "*fixed*: the scenario hangs (or leaks) on vanilla and closes with the layer within its bound, with "
    "0 provider streams open, one close event and nothing left running but reported zombies. "
    "*hang on vanilla*: scenarios whose vanilla close did not end within the vanilla limit or left "
    "something open. *n/a*: the scenario's feature does not exist on the release (reasons below). "
    "*layer fails*: scenarios the layer did not close clean within the bound, run errors, and controls "
    "that failed on vanilla. *worker parts*: the parts `install()` refuses by name there (the rest "
    "installs). *time*: the slower of the release's two catalogue processes."
)


def markdown(results: dict[str, Any], *, command: str) -> str:
    n = len(results["releases"])
    return (
        "\n\n".join(
            [
                f"# livekit-safeclose version matrix: {n} release(s)",
                f"Reproduce: `{command}` ({results['scenarios']} catalogue, {results['jobs']} jobs; "
                f"wall time {results['wall_s']:.0f} s).",
                LEGEND,
                release_table(results),
                "## Vanilla evidence by hang class",
                evidence_table(results),
                "## Scenarios n/a",
                na_table(results),
                "## Worker parts refused",
                worker_table(results),
                "## Failures",
                failures(results),
            ]
        )
        + "\n"
    )
