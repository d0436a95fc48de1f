"""The one compatibility table: every upstream internal the layer reads or patches.

The layer wraps private methods and reads private attributes. A release that renames one
of them must make ``install()`` refuse loudly, naming what is missing, never turn a patch
into a silent no-op; and importing ``livekit_safeclose`` must never fail on such a release,
so nothing here is resolved before :func:`check` runs. The worker parts are checked by the
same table: a part whose internals are missing is refused by name while the rest installs.

``optional`` rows are read with a default (a missing one narrows what the layer sees, it
never breaks a close); they are listed so that every internal touched is in one place.

Where releases differ, the rows of one difference carry a ``shape`` (``"difference:form"``):
the difference is met when every row of one of its forms is, and :func:`shape` names the form
the installed release has, which is how :mod:`.adapters` chooses (never by version string).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .options import Part
from .patching import resolve

logger = logging.getLogger("livekit.agents.safeclose")

#: releases the version matrix has tested (``livekit-safeclose matrix --all``); a newer one
#: runs if its shapes match, with one warning naming this range
TESTED_RANGE = ">=1.5.0,<1.9"
_TESTED_MIN = (1, 5, 0)
_TESTED_MAX_EXCLUSIVE = (1, 9, 0)

#: a patch-table part, or a read-only feature that reads internals too
Feature = Part | Literal["idle_report"]
Kind = Literal["method", "init_attr", "attr", "closure", "uses", "field"]


class IncompatibleLivekitAgents(RuntimeError):
    """The installed livekit-agents lacks internals the layer relies on."""


@dataclass(frozen=True)
class Requirement:
    """One internal a part relies on.

    ``owner`` is ``"module:Qual.Name"`` (or ``"module"``). ``kind``: ``method`` (callable,
    with keyword ``params``), ``init_attr`` (assigned by the owner's ``__init__``), ``attr``
    (exists), ``closure`` (a function nested in the owner named ``name`` closing over
    ``params``), ``uses`` (method ``name``'s code reads the names in ``params``), ``field``
    (a dataclass field)."""

    part: Feature
    owner: str
    name: str
    kind: Kind
    params: tuple[str, ...] = ()
    optional: bool = False
    #: ``"difference:form"``: this row belongs to one form of an internal that differs
    #: between releases; any one complete form meets the difference
    shape: str | None = None

    @property
    def where(self) -> str:
        head = self.owner.split(":", 1)[1] if ":" in self.owner else self.owner
        return f"{head}.{self.name}"

    @property
    def difference(self) -> str | None:
        return self.shape.partition(":")[0] if self.shape else None

    @property
    def form(self) -> str:
        return self.shape.partition(":")[2] if self.shape else ""


def _code_names(fn: Any) -> set[str]:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return set(code.co_names) if code is not None else set()


def _nested(fn: Any, name: str) -> Any:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    for const in getattr(code, "co_consts", ()):
        if getattr(const, "co_name", None) == name:
            return const
    return None


def problem(req: Requirement) -> str | None:
    """What is wrong with ``req`` on the installed release, ``None`` when it is met."""
    try:
        owner = resolve(req.owner)
    except (ImportError, AttributeError):
        return f"{req.owner.replace(':', '.')} (not found)"
    if req.kind == "init_attr":
        init = getattr(owner, "__init__", None)
        return None if req.name in _code_names(init) else f"{req.where} (attribute set in __init__)"
    if req.kind == "field":
        fields = getattr(owner, "__dataclass_fields__", {})
        return None if req.name in fields else f"{req.where} (field)"
    if req.kind == "closure":
        code = _nested(owner, req.name) if callable(owner) else None
        if code is None or not set(req.params) <= set(code.co_freevars):
            return f"{req.owner.split(':')[-1]}.<locals>.{req.name} (closing over {', '.join(req.params)})"
        return None
    if not hasattr(owner, req.name):
        return f"{req.where}()" if req.kind == "method" else req.where
    value = getattr(owner, req.name)
    if req.kind == "method":
        if not callable(value):
            return f"{req.where}()"
        try:
            params = inspect.signature(value).parameters
        except (TypeError, ValueError):
            return None
        absent = [p for p in req.params if p not in params]
        return f"{req.where}() parameter(s) {', '.join(absent)}" if absent else None
    if req.kind == "uses":
        absent = [n for n in req.params if n not in _code_names(value)]
        return f"{req.where} no longer uses {', '.join(absent)}" if absent else None
    return None


def _table(table: Iterable[Requirement] | None) -> tuple[Requirement, ...]:
    from .compat_table import REQUIREMENTS

    return tuple(REQUIREMENTS if table is None else table)


def _forms(rows: Iterable[Requirement]) -> dict[str, dict[str, list[Requirement]]]:
    """The shape rows, by difference and form, in table order."""
    out: dict[str, dict[str, list[Requirement]]] = {}
    for req in rows:
        if req.difference:
            out.setdefault(req.difference, {}).setdefault(req.form, []).append(req)
    return out


def detect_shapes(table: Iterable[Requirement] | None = None) -> dict[str, str | None]:
    """For every difference, the first form (in table order) whose rows are all met on the
    installed release; ``None`` when no form is complete."""
    found: dict[str, str | None] = {}
    for difference, forms in _forms(_table(table)).items():
        found[difference] = next(
            (form for form, rows in forms.items() if all(problem(r) is None for r in rows)), None
        )
    return found


_shapes: dict[str, str | None] | None = None


def shape(difference: str) -> str | None:
    """The form of ``difference`` the installed release has (detected by :func:`check`, or
    on first use)."""
    global _shapes
    if _shapes is None:
        _shapes = detect_shapes()
    return _shapes.get(difference)


def problems(
    features: Iterable[Feature], table: Iterable[Requirement] | None = None
) -> dict[Feature, list[str]]:
    """Unmet requirements per feature (optional rows never count). A difference none of
    whose forms is complete counts once, naming what each form lacks."""
    rows = _table(table)
    wanted = set(features)
    out: dict[Feature, list[str]] = {}
    for req in rows:
        if req.part in wanted and not req.optional and not req.shape and (p := problem(req)) is not None:
            out.setdefault(req.part, []).append(p)
    for difference, forms in _forms(rows).items():
        parts = {r.part for rs in forms.values() for r in rs if not r.optional} & wanted
        lacking = {form: [p for r in rs if (p := problem(r)) is not None] for form, rs in forms.items()}
        if parts and all(lacking.values()):
            text = (
                f"{difference}: none of its forms is complete ("
                + "; ".join(f"{form} lacks {', '.join(ps)}" for form, ps in lacking.items())
                + ")"
            )
            for part in sorted(parts):
                out.setdefault(part, []).append(text)
    return out


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.8.9"`` -> ``(1, 8, 9)``; pre-release and local suffixes are ignored."""
    if not isinstance(text, str):
        raise TypeError(f"version must be a str, not {type(text).__name__}")
    nums: list[int] = []
    for part in text.strip().split("+", 1)[0].split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            raise ValueError(f"cannot parse livekit-agents version {text!r}")
        nums.append(int(digits))
    nums += [0] * (3 - len(nums))
    return nums[0], nums[1], nums[2]


def installed_version() -> str:
    from livekit.agents import __version__

    return str(__version__)


def tested(version: str) -> bool:
    return _TESTED_MIN <= parse_version(version) < _TESTED_MAX_EXCLUSIVE


_warned_untested: set[str] = set()


def check(parts: Iterable[Part], *, table: Iterable[Requirement] | None = None) -> tuple[Part, ...]:
    """The parts that can be installed on this release, in order. Raises
    :class:`IncompatibleLivekitAgents` when a session part (the close itself) cannot; a
    worker part that cannot is refused by name in one WARNING and left out."""
    global _shapes
    version = installed_version()
    wanted = tuple(parts)
    found = problems(wanted, table)
    if table is None:
        _shapes = detect_shapes()
    session_problems = [p for part in ("core", "stream_ledger") for p in found.get(part, [])]
    if session_problems:
        raise IncompatibleLivekitAgents(
            f"livekit-agents {version} lacks internals livekit-safeclose relies on: "
            + "; ".join(session_problems)
            + f". Tested range: {TESTED_RANGE}."
        )
    refused = [p for p in wanted if p in found]
    for part in refused:
        logger.warning(
            "livekit-safeclose: the %s part is not supported on livekit-agents %s (%s); the rest is installed",
            part,
            version,
            "; ".join(found[part]),
        )
    if not tested(version) and version not in _warned_untested:
        _warned_untested.add(version)
        logger.warning(
            "livekit-safeclose was not tested with livekit-agents %s (tested: %s); its shapes match, so it runs",
            version,
            TESTED_RANGE,
        )
    return tuple(p for p in wanted if p not in refused)
