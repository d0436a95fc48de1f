"""One virtual environment per livekit-agents release, built once and reused.

Each venv holds ``livekit-agents==X`` and ``livekit-plugins-silero==X`` (pinned together in
one install: a loose plugin would pull the newest agents), whatever the release's own
imports need that it does not declare (found by importing it, not by its version), and this
checkout, editable and without dependencies, so a reused venv always runs the current code.
``uv`` makes a venv in seconds; without it the standard ``venv`` + ``pip`` do the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: every livekit-agents release the matrix covers (pre-releases aside)
RELEASES: tuple[str, ...] = (
    *(f"1.5.{n}" for n in range(18)),
    *(f"1.6.{n}" for n in range(11)),
    "1.7.0",
    "1.7.1",
    *(f"1.8.{n}" for n in range(10)),
)
#: the first and last release of each minor line: what CI runs
CI_RELEASES: tuple[str, ...] = ("1.5.0", "1.5.17", "1.6.0", "1.6.10", "1.7.0", "1.7.1", "1.8.0", "1.8.9")

#: import name -> distribution, for the undeclared imports met so far
_DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow"}
_IMPORT_CHECK = "import livekit.agents, livekit.agents.voice.agent_session, livekit.plugins.silero"
_READY = ".safeclose-matrix.json"
_INSTALL_TIMEOUT = 600.0


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livekit-safeclose" / "matrix"


def checkout_root() -> Path:
    """The checkout this package runs from (what each venv installs)."""
    return Path(__file__).resolve().parents[3]


@dataclass
class Venv:
    """A release's venv and how it was made."""

    release: str
    path: str
    ok: bool = False
    backend: str = ""
    #: distributions installed because the release imports them without declaring them
    undeclared: list[str] = field(default_factory=list)
    error: str = ""
    build_s: float = 0.0
    reused: bool = False
    checkout: str = ""

    @property
    def python(self) -> str:
        return str(Path(self.path) / "bin" / "python")


def _uv() -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    try:
        import uv  # the PyPI package ships the binary

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return None


def _run(cmd: list[str], timeout: float = _INSTALL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class _Installer:
    """``uv pip`` or the venv's own ``pip``, same arguments."""

    def __init__(self, python: str, uv: str | None) -> None:
        self.python, self.uv = python, uv

    @property
    def backend(self) -> str:
        return "uv" if self.uv else "pip"

    def create(self, path: Path) -> subprocess.CompletedProcess[str]:
        if self.uv:
            return _run([self.uv, "venv", "-q", "--python", sys.executable, str(path)])
        return _run([sys.executable, "-m", "venv", str(path)])

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self.uv:
            return _run([self.uv, "pip", "install", "-q", "--python", self.python, *args])
        return _run([self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args])


def _fail(venv: Venv, what: str, proc: subprocess.CompletedProcess[str]) -> Venv:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    venv.error = f"{what}: " + " | ".join(tail)
    return venv


def _undeclared(venv: Venv, installer: _Installer) -> bool:
    """Import the release; install each module it imports without declaring it (the
    1.5.x-1.6.x ``httpx``), at most three. True when it imports. The import also leaves the
    bytecode of exactly what the runs import (compiling every installed package up front
    would cost more than it saves)."""
    for _ in range(4):
        proc = _run([venv.python, "-c", _IMPORT_CHECK])
        if proc.returncode == 0:
            return True
        found = re.search(r"No module named '([^'.]+)", proc.stderr)
        if not found or len(venv.undeclared) >= 3:
            _fail(venv, "import livekit.agents", proc)
            return False
        dist = _DISTRIBUTIONS.get(found.group(1), found.group(1))
        if installer.install(dist).returncode != 0:
            venv.error = f"import livekit.agents needs {dist}, which does not install"
            return False
        venv.undeclared.append(dist)
    return False


def _install_checkout(venv: Venv, installer: _Installer, checkout: Path) -> bool:
    proc = installer.install("--no-deps", "-e", str(checkout))
    if proc.returncode != 0:
        _fail(venv, "install this checkout", proc)
        return False
    venv.checkout = str(checkout)
    return True


def ensure(release: str, cache: Path, *, rebuild: bool = False, checkout: Path | None = None) -> Venv:
    """The venv of ``release`` under ``cache``, built (or reused) with this checkout in it."""
    checkout = checkout or checkout_root()
    path = cache / release
    ready = path / _READY
    t0 = time.monotonic()
    if rebuild and path.exists():
        shutil.rmtree(path)
    if ready.exists():
        venv = Venv(**json.loads(ready.read_text()))
        venv.reused = True
        if venv.ok and Path(venv.python).exists():
            if venv.checkout != str(checkout):
                installer = _Installer(venv.python, _uv())
                if not _install_checkout(venv, installer, checkout):
                    return venv
                ready.write_text(json.dumps(asdict(venv)))
            venv.build_s = round(time.monotonic() - t0, 1)
            return venv
        shutil.rmtree(path)
    venv = _build(release, path, checkout)
    venv.build_s = round(time.monotonic() - t0, 1)
    if venv.ok:
        ready.write_text(json.dumps(asdict(venv)))
    return venv


def _build(release: str, path: Path, checkout: Path) -> Venv:
    venv = Venv(release=release, path=str(path))
    installer = _Installer(venv.python, _uv())
    venv.backend = installer.backend
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    try:
        if (proc := installer.create(path)).returncode != 0:
            return _fail(venv, "create the venv", proc)
        # one install: a plugin pinned apart would pull the newest livekit-agents
        proc = installer.install(f"livekit-agents=={release}", f"livekit-plugins-silero=={release}")
        if proc.returncode != 0:
            return _fail(venv, f"pip install livekit-agents=={release}", proc)
        if not _undeclared(venv, installer) or not _install_checkout(venv, installer, checkout):
            return venv
    except subprocess.TimeoutExpired as exc:
        venv.error = f"timed out: {' '.join(map(str, exc.cmd))[:120]}"
        return venv
    venv.ok = True
    return venv
