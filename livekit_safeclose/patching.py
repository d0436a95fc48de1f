"""The one apply/revert mechanism for every row of :mod:`.patch_table`.

Rules, each enforced here and nowhere else:

* **Atomic apply.** Rows are applied in table order; if one fails, the rows this call
  already applied are reverted before the error propagates, so a failed install leaves
  livekit-agents exactly as it was.
* **Exact revert.** The value saved is the owner's *own* attribute (``vars(owner)``), not an
  inherited one: reverting an attribute that was inherited deletes it again, and an
  attribute that did not exist before is deleted, never set to a placeholder.
* **``__wrapped__`` everywhere.** Every replacement exposes the original it stands for
  (``None`` for an attribute that was new), so tools and readers can always find upstream.
* **Nothing imported before it is needed.** Owners and factories are named by dotted
  strings and resolved only when a row is applied, after the compatibility check. A row of
  an optional extra that takes seconds to import (the ``mcp`` SDK) waits until something
  else imported its module (``if_imported``); :func:`catch_up` applies it then.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .options import Options, Part

#: marks an attribute the owner did not have before the patch
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "<absent>"})()
_MISSING = object()


@dataclass(frozen=True)
class Patch:
    """One patched target.

    ``owner``: ``"module:Qual.Name"`` (a class or object inside a module) or ``"module"``
    (a module attribute). ``factory``: ``"module:function"``, called as
    ``factory(original, options)`` with the original value (``ABSENT`` if new) and returning
    the replacement. ``parts``: the row is applied when any of these parts is enabled.
    ``refresh``: the replacement depends on the options, so a re-install with other options
    makes it again. ``change``: what the replacement does differently, for the README."""

    parts: frozenset[Part]
    owner: str
    attribute: str
    factory: str
    change: str
    refresh: bool = False
    #: ``"module:function"`` called with no arguments right after the row is reverted: for
    #: state that lives outside the attribute (a signal handler installed at the OS level)
    on_revert: str | None = None
    #: the owner, or the attribute on it, exists only on some releases (a beta tool, a
    #: method added later): skipped where it is absent
    if_present: bool = False
    #: the owner's module is an optional extra that is slow to import: never imported for
    #: the row, which is applied once the module is (by :func:`apply` or :func:`catch_up`)
    if_imported: bool = False
    #: ``"difference:form"`` (see :mod:`.compat`): applied only where the installed release
    #: has that form of the difference
    shape: str | None = None

    @property
    def module(self) -> str:
        return self.owner.split(":", 1)[0]

    @property
    def target(self) -> str:
        """``Owner.attribute`` as the README names it."""
        head = self.owner.split(":", 1)[1] if ":" in self.owner else self.owner
        return f"{head}.{self.attribute}"


@dataclass
class _Applied:
    owner: Any
    saved: Any
    replacement: Any
    options: Options


_applied: dict[Patch, _Applied] = {}
_enabled: set[Part] = set()
_lock = threading.RLock()


def resolve(dotted: str) -> Any:
    """``"pkg.mod:A.b"`` -> the object; ``"pkg.mod"`` -> the module."""
    module_name, _, qual = dotted.partition(":")
    obj: Any = importlib.import_module(module_name)
    for name in qual.split(".") if qual else ():
        obj = getattr(obj, name)
    return obj


def _make(row: Patch, owner: Any, options: Options) -> tuple[Any, Any]:
    saved = vars(owner).get(row.attribute, ABSENT)
    original = getattr(owner, row.attribute, ABSENT)
    replacement = resolve(row.factory)(original, options)
    wrapped = getattr(replacement, "__wrapped__", _MISSING)
    expected = None if original is ABSENT else original
    if wrapped is _MISSING or wrapped is not expected:
        raise TypeError(f"{row.factory} must return a replacement whose __wrapped__ is the original")
    return saved, replacement


def _apply_row(row: Patch, options: Options) -> None:
    if row.if_imported and row.module not in sys.modules:
        return
    if row.shape is not None:
        from .compat import shape

        difference, _, form = row.shape.partition(":")
        if shape(difference) != form:
            return
    try:
        owner = resolve(row.owner)
    except (ImportError, AttributeError):
        if row.if_present:
            return
        raise
    if row.if_present and not hasattr(owner, row.attribute):
        return
    saved, replacement = _make(row, owner, options)
    setattr(owner, row.attribute, replacement)
    _applied[row] = _Applied(owner, saved, replacement, options)


def _revert_row(row: Patch) -> None:
    entry = _applied.pop(row)
    if vars(entry.owner).get(row.attribute, ABSENT) is not entry.replacement:
        # someone patched over us: restoring would drop their change
        return
    if entry.saved is ABSENT:
        delattr(entry.owner, row.attribute)
    else:
        setattr(entry.owner, row.attribute, entry.saved)
    if row.on_revert is not None:
        resolve(row.on_revert)()


def apply(rows: Iterable[Patch], parts: Iterable[Part], options: Options, *, exclusive: bool = True) -> None:
    """Apply the rows of ``parts``, atomically. ``exclusive``: also revert the rows of every
    other part (``install()``); otherwise leave them as they are (the subclass only makes
    sure what it needs is there)."""
    wanted = set(parts)
    with _lock:
        done: list[Patch] = []
        try:
            for row in rows:
                on = bool(row.parts & wanted)
                if row in _applied:
                    if not on and exclusive:
                        _revert_row(row)
                    elif on and row.refresh and _applied[row].options != options:
                        _revert_row(row)
                        _apply_row(row, options)
                    continue
                if on:
                    _apply_row(row, options)
                    if row in _applied:
                        done.append(row)
        except BaseException:
            for row in reversed(done):
                _revert_row(row)
            raise
        if exclusive:
            _enabled.clear()
        _enabled.update(wanted)


def catch_up(rows: Iterable[Patch]) -> None:
    """Apply the enabled rows that waited for their module (``if_imported``) now that it is
    imported: called before a session starts, which is when its MCP servers spawn."""
    with _lock:
        if not _applied:
            return
        pending = [
            r
            for r in rows
            if r.if_imported and r not in _applied and r.parts & _enabled and r.module in sys.modules
        ]
        if pending:
            options = next(iter(_applied.values())).options
            apply(pending, set(_enabled), options, exclusive=False)


def revert_all() -> None:
    """Restore every original exactly, newest first. A no-op when nothing is applied."""
    with _lock:
        for row in reversed(list(_applied)):
            _revert_row(row)
        _enabled.clear()


def applied_parts() -> set[Part]:
    """The parts the last :func:`apply` enabled (empty after :func:`revert_all`)."""
    return set(_enabled) if _applied else set()


def is_applied(row: Patch) -> bool:
    return row in _applied


def original(row: Patch) -> Any:
    """What ``row`` replaced (``ABSENT`` if new); only while applied."""
    return _applied[row].saved
