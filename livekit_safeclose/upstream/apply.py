"""A tiny unified-diff applier: ``verify`` proves the generated diff itself applies (to a
copy of the installed livekit-agents), not only that the generator's files import."""

from __future__ import annotations

import re
from pathlib import Path

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(Exception):
    """A hunk whose context does not match the file."""


def _files(diff: str) -> list[tuple[str, list[str]]]:
    """``(path after the change, the file's hunk lines)`` per file of ``diff``."""
    out: list[tuple[str, list[str]]] = []
    for line in diff.splitlines(keepends=True):
        if line.startswith("+++ "):
            out.append((line[4:].strip().removeprefix("b/"), []))
        elif line.startswith("--- ") and (not out or out[-1][1]):
            continue
        elif out:
            out[-1][1].append(line)
    return out


def _apply_one(old: list[str], hunks: list[str]) -> list[str]:
    new: list[str] = []
    pos = 0  # next line of ``old`` not yet copied
    i = 0
    while i < len(hunks):
        m = _HUNK.match(hunks[i])
        if m is None:
            raise PatchError(f"not a hunk header: {hunks[i]!r}")
        start = int(m.group(1)) - (0 if m.group(2) == "0" else 1)
        new += old[pos:start]
        pos = start
        i += 1
        while i < len(hunks) and not hunks[i].startswith("@@"):
            tag, text = hunks[i][:1], hunks[i][1:]
            if tag in (" ", "-"):
                if pos >= len(old) or old[pos] != text:
                    raise PatchError(f"context mismatch at line {pos + 1}: {text!r}")
                pos += 1
            if tag in (" ", "+"):
                new.append(text)
            i += 1
    return new + old[pos:]


def apply(diff: str, root: Path, strip: str) -> list[Path]:
    """Apply ``diff`` under ``root``, each path with the prefix ``strip`` removed (a path
    outside it is skipped: the tests go elsewhere). The files written."""
    written = []
    for path, hunks in _files(diff):
        if not path.startswith(strip):
            continue
        target = root / path.removeprefix(strip)
        old = target.read_text().splitlines(keepends=True) if target.exists() else []
        target.write_text("".join(_apply_one(old, hunks)))
        written.append(target)
    return written
