#!/usr/bin/env bash
# Runs the Python interop suite (official Azure IoT SDKs) against a real ferrohub server.
#   bash interop/run.sh [extra pytest args]
# FERROHUB_BIN: the server binary (default: <repo>/target/debug/ferrohub; a relative path is
# taken from the directory you call this from). Needs ports 8883 and 443 free (run as root).
set -euo pipefail

INTEROP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INTEROP_DIR/.." && pwd)"
VENV="$INTEROP_DIR/.venv"
REQS="$INTEROP_DIR/requirements.txt"
STAMP="$VENV/.requirements.sha256"

bin="${FERROHUB_BIN:-$REPO_ROOT/target/debug/ferrohub}"
case "$bin" in
  /*) ;;
  *) bin="$PWD/$bin" ;;
esac
if [[ ! -x "$bin" ]]; then
  echo "interop/run.sh: server binary not found or not executable: $bin" >&2
  echo "  build it with: cargo build -p ferrohub   (or set FERROHUB_BIN)" >&2
  exit 2
fi
export FERROHUB_BIN="$bin"

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
  echo "$want" >"$STAMP"
fi

cd "$REPO_ROOT"
exec "$VENV/bin/python" -m pytest -v interop/tests "$@"
