#!/usr/bin/env bash
# Runs the interop suite (official Azure IoT SDKs: Python, and the Node service clients in
# interop/node driven from Python) against a real ferrohub server.
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

# The Node clients, pinned by interop/node/package-lock.json.
NODE_DIR="$INTEROP_DIR/node"
NODE_STAMP="$NODE_DIR/node_modules/.package-lock.sha256"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "interop/run.sh: node and npm are needed for the Node clients (scripts/test.sh installs them)" >&2
  exit 2
fi
want="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
have="$(cat "$NODE_STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
  npm ci --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error
  echo "$want" >"$NODE_STAMP"
fi

cd "$REPO_ROOT"
exec "$VENV/bin/python" -m pytest -v interop/tests "$@"
