"""``livekit-safeclose matrix``: the catalogue on every livekit-agents release, vanilla and
with the layer, as one table.

:mod:`.venvs` builds one venv per release (cached, reused), :mod:`.child` runs inside it,
:mod:`.verdicts` says what each pair of runs shows, :mod:`.run` schedules the releases, and
:mod:`.table` writes the Markdown.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .venvs import CI_RELEASES, RELEASES, default_cache

__all__ = ["CI_RELEASES", "RELEASES", "add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--releases", help="comma-separated releases (default: the CI set)")
    which.add_argument("--all", action="store_true", help=f"all {len(RELEASES)} releases 1.5.0-1.8.9")
    parser.add_argument("--scenarios", default="all", help="all (default), lean, or comma-separated ids")
    parser.add_argument("--jobs", type=int, default=4, help="catalogue shards run at once (default 4)")
    parser.add_argument("--shards", type=int, default=2, help="processes per release (default 2)")
    parser.add_argument("--cache", type=Path, default=None, help=f"venv cache (default {default_cache()})")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the venvs instead of reusing them")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown here")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only write the table of an earlier run's JSON",
    )


def _releases(args: argparse.Namespace) -> list[str]:
    if args.all:
        return list(RELEASES)
    if not args.releases:
        return list(CI_RELEASES)
    wanted = [r.strip() for r in args.releases.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in RELEASES]
    if unknown:
        raise SystemExit(
            f"not a release the matrix covers: {', '.join(unknown)}; known: {', '.join(RELEASES)}"
        )
    return wanted


def ok(results: dict[str, object]) -> bool:
    """True when every release installs and no scenario fails with the layer."""
    from .table import counts

    recs = results["releases"]
    assert isinstance(recs, dict)
    for rec in recs.values():
        c = counts(rec)
        if (
            not rec.get("install", {}).get("ok")
            or c["FAIL"]
            or c["errors"]
            or c["error"]
            or c["vanilla control failed"]
        ):
            return False
    return True


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from .run import Matrix
    from .table import markdown

    if args.render is not None:
        results = json.loads(args.render.read_text())
        text = markdown(results, command=str(results.get("command", "")))
        if args.markdown:
            args.markdown.write_text(text)
        print(text)
        return 0 if ok(results) else 1
    releases = _releases(args)
    results = Matrix(
        releases,
        scenarios=args.scenarios,
        jobs=args.jobs,
        shards=args.shards,
        cache=args.cache or default_cache(),
        rebuild=args.rebuild,
    ).run()
    command = "livekit-safeclose " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    results["command"] = command
    results["ok"] = ok(results)
    text = markdown(results, command=command)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    return 0 if results["ok"] else 1
