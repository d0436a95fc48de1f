"""The upstream diff, generated at run time from the installed livekit-agents sources.

Nothing of upstream is stored here: each target method is found in the installed file with
``ast`` (by class and method name), upstream's own body is kept under a new name
(``<name>_unbounded``) and a method of the old name, which runs it bounded through
``livekit.agents.voice._bounded_close`` (our code, from :mod:`.template`), is inserted
before it. The diff's paths follow upstream's repository layout:
``a/livekit-agents/livekit/agents/...`` (apply it with ``git apply`` or ``patch -p1`` in a
checkout of livekit/agents).
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from pathlib import Path

#: where upstream's repository keeps the package
REPO_PREFIX = "livekit-agents/livekit/agents/"
HELPER = "voice/_bounded_close.py"
#: the new private modules: the close, and what works for the session (how it is cancelled)
HELPERS = (HELPER, "voice/_bounded_close_tasks.py")
#: the upstream-style regression tests, where upstream keeps its tests (the first holds the
#: fakes the others import)
TESTS = ("tests/test_bounded_close.py", "tests/test_bounded_close_handover.py")
TEMPLATE_DIR = Path(__file__).parent / "template"
TESTS_TEMPLATE_DIR = Path(__file__).parent.parent / "testing" / "upstream"


class UnsupportedRelease(Exception):
    """A target shape the generator needs is missing from the installed release."""


@dataclass(frozen=True)
class Target:
    """One upstream method the diff rewrites: ``file`` (relative to ``livekit/agents``),
    ``cls.method``, the helper function that bounds it, and the parameters it must have."""

    file: str
    cls: str
    method: str
    helper: str
    params: tuple[str, ...]
    why: str


TARGETS: tuple[Target, ...] = (
    Target("voice/agent_session.py", "AgentSession", "_aclose_impl", "close_session",
           ("reason", "drain", "error"),
           "every close path joins one closing task with a deadline, awaited shielded"),
    Target("voice/agent_session.py", "AgentSession", "_close_soon", "close_soon",
           ("reason", "drain", "error"),
           "a forced request escalates a graceful close; a finished closing task is reset"),
    Target("voice/agent_activity.py", "AgentActivity", "drain", "drain_activity", ("new_activity",),
           "bounded by the drain deadline, then its tasks are force-cancelled lock-free"),
    Target("voice/agent_activity.py", "AgentActivity", "aclose", "close_activity", (),
           "tools cancelled first, bounded, hung model streams stopped"),
    Target("voice/agent_session.py", "AgentSession", "_set_user_away_timer", "set_user_away_timer", (),
           "a closed session arms no timer"),
    Target("beta/tools/end_call.py", "EndCallTool", "_end_call", "end_call", ("ctx",),
           "a goodbye that never plays out closes the session by force after GRACEFUL_TIMEOUT"),
)  # fmt: skip

#: attributes the helper reads, per class: a release without one is refused by name
READS: dict[str, tuple[str, ...]] = {
    "AgentSession": ("_lock", "_started", "_activity", "_closing_task", "_opts", "_cancel_user_away_timer"),
    "AgentActivity": ("_lock", "_closed", "_speech_tasks", "_scheduling_atask", "_tool_executor",
                      "_audio_recognition", "_scheduling_paused", "_add_drain_blocked_tasks"),
}  # fmt: skip


def _class(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    return next((n for n in cls.body if isinstance(n, funcs) and n.name == name), None)


def _forward(func: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The call arguments that pass every parameter of ``func`` (``self`` aside) on."""
    a = func.args
    pos = [p.arg for p in a.posonlyargs + a.args][1:]
    parts = pos + ([f"*{a.vararg.arg}"] if a.vararg else [])
    parts += [f"{p.arg}={p.arg}" for p in a.kwonlyargs]
    parts += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return ", ".join(parts)


def _check_shape(source: str, tree: ast.Module, target: Target) -> ast.FunctionDef | ast.AsyncFunctionDef:
    cls = _class(tree, target.cls)
    func = _method(cls, target.method) if cls is not None else None
    if cls is None or func is None:
        raise UnsupportedRelease(f"{target.file}: no {target.cls}.{target.method}")
    names = {p.arg for p in func.args.args + func.args.kwonlyargs}
    missing = [p for p in target.params if p not in names]
    if missing:
        raise UnsupportedRelease(f"{target.cls}.{target.method} has no parameter {', '.join(missing)}")
    if _method(cls, unbounded_name(target.method)) is not None:
        raise UnsupportedRelease(f"{target.cls}.{target.method}: already patched")
    seg = ast.get_source_segment(source, cls) or ""
    absent = [r for r in READS.get(target.cls, ()) if f"self.{r}" not in seg and f"def {r}" not in seg]
    if absent:
        raise UnsupportedRelease(f"{target.cls} has no {', '.join(absent)}")
    return func


def unbounded_name(method: str) -> str:
    """Where upstream's own body of ``method`` is kept: ``drain`` -> ``_drain_unbounded``."""
    return f"_{method.lstrip('_')}_unbounded"


def _signature_end(func: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """The 0-based line past the signature's last line (the one ending with ``:``)."""
    a = func.args
    nodes: list[ast.AST] = [*a.posonlyargs, *a.args, *a.kwonlyargs, *a.defaults, *a.kw_defaults]  # type: ignore[list-item]
    nodes += [n for n in (a.vararg, a.kwarg, func.returns) if n is not None]
    end = max([getattr(n, "end_lineno", None) or func.lineno for n in nodes] + [func.lineno]) - 1
    while not lines[end].split("#")[0].rstrip().endswith(":"):
        end += 1
    return end + 1


def _import_line(file: str) -> str:
    """The helper's import, relative from ``file`` (e.g. ``beta/tools/end_call.py``)."""
    package = Path(file).parent.parts
    if package == ("voice",):
        return "from . import _bounded_close\n"
    return f"from {'.' * (len(package) + 1)}voice import _bounded_close\n"


def _rewrite(source: str, targets: list[Target]) -> str:
    """``source`` with each target wrapped: upstream's method renamed, the bounded one
    inserted before it, and the helper imported."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (first line, past-last line, new lines), 0-based
    for target in targets:
        func = _check_shape(source, tree, target)
        start = (func.decorator_list[0].lineno if func.decorator_list else func.lineno) - 1
        header = lines[func.lineno - 1 : _signature_end(func, lines)]
        indent = " " * (func.col_offset + 4)
        kept = unbounded_name(target.method)
        args = [f"self.{kept}", *filter(None, _forward(func).split(", "))]
        awaited = "await " if isinstance(func, ast.AsyncFunctionDef) else ""
        call = f"{indent}return {awaited}_bounded_close.{target.helper}(self, {', '.join(args)})\n"
        if len(call) > 100:  # upstream's line length
            call = f"{indent}return {awaited}_bounded_close.{target.helper}(\n"
            call += "".join(f"{indent}    {a},\n" for a in ["self", *args]) + f"{indent})\n"
        body = [f'{indent}"""Bounded: see ``_bounded_close.{target.helper}``."""\n', call, "\n"]
        def_line = lines[func.lineno - 1]
        renamed = def_line.replace(f"def {target.method}(", f"def {kept}(", 1)
        edits.append((start, start, header + body))
        edits.append((func.lineno - 1, func.lineno, [renamed]))
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    first_def = next(n.lineno for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef))
    last_import = max(n.end_lineno or n.lineno for n in imports if n.lineno < first_def)
    edits.append((last_import, last_import, [_import_line(targets[0].file)]))
    for first, past, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        lines[first:past] = new
    return "".join(lines)


@dataclass(frozen=True)
class Patched:
    """The generated change: path in upstream's repository -> (old, new) text (old is
    empty for a new file)."""

    files: dict[str, tuple[str, str]]

    def diff(self) -> str:
        out: list[str] = []
        for rel, (old, new) in sorted(self.files.items()):
            a = "/dev/null" if not old else f"a/{rel}"
            out += difflib.unified_diff(
                old.splitlines(keepends=True), new.splitlines(keepends=True), a, f"b/{rel}"
            )
        return "".join(out)

    def stat(self) -> list[tuple[str, int, int]]:
        """``(path, lines added, lines removed)`` per file."""
        rows = []
        for rel, (old, new) in sorted(self.files.items()):
            sm = difflib.SequenceMatcher(None, old.splitlines(), new.splitlines(), autojunk=False)
            added = removed = 0
            for tag, i1, i2, j1, j2 in sm.get_opcodes():
                if tag in ("replace", "delete"):
                    removed += i2 - i1
                if tag in ("replace", "insert"):
                    added += j2 - j1
            rows.append((rel, added, removed))
        return rows


def agents_root() -> Path:
    """The installed ``livekit/agents`` directory."""
    import importlib.util

    spec = importlib.util.find_spec("livekit.agents")
    if spec is None or spec.origin is None:
        raise UnsupportedRelease("livekit-agents is not installed")
    return Path(spec.origin).parent


def generate(root: Path | None = None, *, with_tests: bool = False) -> Patched:
    """The patched files of the livekit-agents at ``root`` (default: the installed one)."""
    root = root or agents_root()
    files: dict[str, tuple[str, str]] = {}
    for rel in dict.fromkeys(t.file for t in TARGETS):
        old = (root / rel).read_text()
        files[REPO_PREFIX + rel] = (old, _rewrite(old, [t for t in TARGETS if t.file == rel]))
    for helper in HELPERS:
        if (root / helper).exists():
            raise UnsupportedRelease(f"{helper} exists already")
        files[REPO_PREFIX + helper] = ("", (TEMPLATE_DIR / Path(helper).name).read_text())
    if with_tests:
        for rel in TESTS:
            files[rel] = ("", (TESTS_TEMPLATE_DIR / Path(rel).name).read_text())
    return Patched(files)
