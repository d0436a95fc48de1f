"""``upstream diff --describe``: the PR description for the generated diff.

The before/after table is read from a ``livekit-safeclose upstream verify --json`` run
(``--from-json``): the numbers are measured on this machine, never written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .generate import TARGETS, Patched

_PROBLEM = """\
## Problem

Every close path of `AgentSession` (`aclose()`, `shutdown()`, close-on-disconnect, the error
close) awaits `AgentActivity.drain()` and `AgentActivity.aclose()` without a bound. `drain()`
holds the activity lock while it waits for every speech task, and `aclose()` needs that lock
before it closes the models. So one function tool parked on an await (or swallowing
`CancelledError`), one `on_enter`/`on_exit` that never returns, a reply into a caller who
already hung up (the sink never reports playout), or one provider stream whose close waits
for a goodbye keeps the session, its STT/TTS/LLM connections and the job open forever, and
the `close` event never comes. `shutdown()` after a restart is a no-op (the finished closing
task is never reset).
"""

_SAME = """\
## What stays the same

* A healthy close runs upstream's own close code, unchanged, inside the shared closing
  task: the bounds only act when they pass.
* `shutdown(drain=True)` still drains gracefully: it waits for the goodbye and for slow
  tools; only after `GRACEFUL_TIMEOUT` (30 s) is it forced.
* The final-transcript wait (`session_close_transcript_timeout`) is kept: the models are
  closed after it, and a hung stream is stopped only past it.
* The `close` event is emitted exactly once per started session, by the same code as today
  when the close reaches it; only an abandoned close emits it from the helper.
* The bounds (`DRAIN_TIMEOUT` 5 s, `CLOSE_TIMEOUT` 10 s, `GRACEFUL_TIMEOUT` 30 s) are module
  constants of `voice/_bounded_close.py`; making them `AgentSession` options is a follow-up.
"""


def _changes() -> str:
    out = ["## The change, method by method", ""]
    for t in TARGETS:
        out.append(f"* `{t.cls}.{t.method}` ({t.file}): {t.why}. Upstream's body is kept "
                   f"unchanged as `{t.cls}._{t.method.lstrip('_')}_unbounded`; the method runs it "
                   f"through `_bounded_close.{t.helper}`.")  # fmt: skip
    out.append("* `voice/_bounded_close.py` (new): one closing task per session with a deadline "
               "that every close path joins; the drain bound with a lock-free force-cancel of the "
               "speech, tool and scheduling tasks (a task that swallows the cancellation is taken "
               "out of the bookkeeping); the models closed even when the drain wedges (a hung "
               "stream's task cancelled again); completion of an abandoned close (the close event "
               "once, the tasks still working for the session cancelled).")  # fmt: skip
    out.append("* `voice/_bounded_close_tasks.py` (new): what works for a closing session (its "
               "activities, outputs, model streams and the tasks running on its behalf) and how "
               "the close cancels it, lock-free and bounded by the caller.")  # fmt: skip
    return "\n".join(out) + "\n"


def _table(results: dict[str, Any]) -> str:
    from ..cli import _cell

    rows = ["| scenario | close path | before | after | verdict |", "|---|---|---|---|---|"]
    for r in results["scenarios"]:
        rows.append(f"| {r['scenario']} | {r['path']} | {_cell(r['vanilla'])} | {_cell(r['layer'])} "
                    f"| {r['verdict']} |")  # fmt: skip
    fixed = sum(r["verdict"] == "fixed" for r in results["scenarios"])
    tests = results.get("tests") or {}
    return (
        f"## Measured (livekit-agents {results['livekit_agents']}, `livekit-safeclose upstream verify`)\n\n"
        f"{fixed} scenarios hang on the release and close cleanly with this change; 'open' is the "
        "provider connections still open, 'tasks' the tasks still running.\n"
        + (f"Regression tests: {tests.get('summary')}.\n" if tests else "")
        + "\n"
        + "\n".join(rows)
        + "\n"
    )


def describe(patched: Patched, from_json: Path | None) -> str:
    rows = patched.stat()
    size = (
        f"{len(rows)} files, +{sum(r[1] for r in rows)} -{sum(r[2] for r in rows)} lines "
        f"({', '.join(f'{p} +{a} -{r}' for p, a, r in rows)})"
    )
    if from_json is not None:
        measured = _table(json.loads(from_json.read_text()))
    else:
        measured = ("## Measured\n\nRun `livekit-safeclose upstream verify --json > verify.json` and "
                    "`livekit-safeclose upstream diff --describe --from-json verify.json` for the table.\n")  # fmt: skip
    tests = (
        "\n## Tests\n\n`tests/test_bounded_close.py`: one test per hang class, on fakes; "
        "`tests/test_bounded_close_handover.py`: a close inside an `AgentTask`'s hand-over.\n"
    )
    return f"# Bound every AgentSession close\n\nSize: {size}.\n\n{_PROBLEM}\n{_changes()}\n{_SAME}\n{measured}{tests}"
