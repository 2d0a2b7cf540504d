#!/usr/bin/env bash
# Refreshes the web explorer's screenshots in docs/screenshots/ (1280x800 PNGs of each page),
# taken by the browser tests (interop/tests/test_explorer.py) against a real hub. Builds
# nothing: it uses the ferrohub binary interop/run.sh uses ($FERROHUB_BIN, default
# target/debug/ferrohub; rebuild it after changing crates/ferrohub/explorer/, which is embedded).
# Needs chromium and chromium-driver (scripts/test.sh installs them) and ports 8883/443/5671.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$PWD/docs/screenshots"
mkdir -p "$out"
EXPLORER_SCREENSHOTS="$out" bash interop/run.sh -k explorer "$@"
echo "screenshots in $out:"
ls -1 "$out"
