#!/usr/bin/env bash
# The version matrix in CI: the first and last release of each minor line (1.5.0, 1.5.17,
# 1.6.0, 1.6.10, 1.7.0, 1.7.1, 1.8.0, 1.8.9), each in its own cached venv, the lean catalogue
# (every hang class along one close path, plus the race, escalation, graceful and control
# scenarios) on vanilla and with the layer. Fails when a release does not install or a
# scenario does not close clean within its bound with the layer. The full table over all
# 41 releases is `livekit-safeclose matrix --all` (README "Supported releases").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${MATRIX_OUT:-${TMPDIR:-/tmp}/livekit-safeclose-matrix}
mkdir -p "$OUT"
# uv (a dev extra) builds each venv in seconds; without it the matrix uses venv + pip
"$PY" -m livekit_safeclose matrix --scenarios lean --jobs "${MATRIX_JOBS:-4}" \
  --json "$OUT/matrix.json" --markdown "$OUT/matrix.md"
