"""``livekit-safeclose upstream diff|verify``: the layer's close-path fix as a diff against
the installed livekit-agents (generated at run time, never stored), and its proof.

:mod:`.generate` writes the diff (upstream's methods found with ``ast``, wrapped in place;
the helper module from :mod:`.template`, the tests from ``testing/upstream``), :mod:`.apply`
applies it, :mod:`.verify` runs the catalogue on a patched copy, :mod:`.describe` writes
the PR description.
"""

from __future__ import annotations

import argparse
import sys

from .verify import add_arguments

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from .generate import UnsupportedRelease

    try:
        if args.upstream_command == "verify":
            from .verify import verify

            return verify(args)
        return _diff(args)
    except UnsupportedRelease as exc:
        from .. import compat

        print(f"error: livekit-agents {compat.installed_version()} is not a release the upstream diff "
              f"generator supports: {exc}", file=sys.stderr)  # fmt: skip
        return 2


def _diff(args: argparse.Namespace) -> int:
    from .generate import generate

    patched = generate(with_tests=args.with_tests)
    if args.describe:
        from .describe import describe

        text = describe(patched, args.from_json)
    elif args.stat:
        rows = patched.stat()
        width = max(len(p) for p, _, _ in rows)
        text = "".join(f" {p.ljust(width)} | +{a} -{r}\n" for p, a, r in rows)
        text += f" {len(rows)} files changed, {sum(r[1] for r in rows)} insertions(+), "
        text += f"{sum(r[2] for r in rows)} deletions(-)\n"
    else:
        text = patched.diff()
    if args.output is not None:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
