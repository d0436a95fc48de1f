#!/usr/bin/env bash
# Plain-install smoke: what `pip install livekit-safeclose` gives a user, not the dev checkout.
#  1. the wheel alone (no extras): `check` must refuse at once, exit 2, with the install line;
#  2. the wheel with [testing]: `check --only healthy-aclose` must pass (exit 0).
# Builds from a copy of the working tree, so the checkout gets no build/ or stale files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
	echo "wheel_smoke: FAIL: $*" >&2
	exit 1
}

mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard |
	tar --null --ignore-failed-read -cf - -T - 2>/dev/null | tar -xf - -C "$tmp/src"

"$PY" -m venv "$tmp/venv"
bin="$tmp/venv/bin"
"$bin/pip" wheel -q --no-deps -w "$tmp/dist" "$tmp/src"
wheel=$(ls "$tmp"/dist/livekit_safeclose-*.whl)
echo "wheel_smoke: built $(basename "$wheel")"

"$bin/pip" install -q "$wheel"
rc=0
"$bin/livekit-safeclose" check >"$tmp/out" 2>"$tmp/err" || rc=$?
echo "wheel_smoke: plain install: check -> exit $rc: $(cat "$tmp/err")"
[ "$rc" -eq 2 ] || fail "plain install: expected exit 2, got $rc; stdout: $(cat "$tmp/out")"
[ "$(wc -l <"$tmp/err")" -eq 1 ] || fail "plain install: expected one line on stderr"
grep -qF 'pip install "livekit-safeclose[testing]"' "$tmp/err" || fail "plain install: no install line"
[ ! -s "$tmp/out" ] || fail "plain install: check printed a table: $(cat "$tmp/out")"
"$bin/livekit-safeclose" check --list >/dev/null || fail "plain install: check --list failed"

"$bin/pip" install -q "$wheel[testing]"
rc=0
"$bin/livekit-safeclose" check --only healthy-aclose >"$tmp/out" 2>"$tmp/err" || rc=$?
cat "$tmp/out"
[ "$rc" -eq 0 ] || fail "[testing] install: check --only healthy-aclose -> exit $rc: $(tail -5 "$tmp/err")"
echo "wheel_smoke: ok"
