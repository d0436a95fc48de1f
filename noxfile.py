"""nox sessions. ``nox -s matrix -- --all`` runs the version matrix over every livekit-agents
release (arguments after ``--`` go to ``livekit-safeclose matrix``); uv makes the venvs fast
where it is installed (``pip install uv``)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["matrix"]


@nox.session(python=False)
def matrix(session: nox.Session) -> None:
    """The catalogue on each release, vanilla and with the layer (its own cached venv per
    release, so this session needs none: it runs in the current environment)."""
    session.run("livekit-safeclose", "matrix", *session.posargs)
