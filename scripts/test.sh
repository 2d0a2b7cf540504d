#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Debian
# mosquitto-clients, a Python venv with the official Azure SDKs), then runs
#   1. cargo test for every crate (unit + integration tests over real TLS sockets),
#   2. the README quickstart with mosquitto_pub against a real server,
#   3. the Python SDK interop suite (azure-iot-device, azure-iot-hub) on ports 8883/443.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto_pub >/dev/null 2>&1; then
  echo "== installing mosquitto-clients"
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq mosquitto-clients >/dev/null
fi

echo "== cargo test"
cargo build --workspace --all-targets
cargo test --workspace

echo "== README quickstart with mosquitto_pub"
bash scripts/quickstart-test.sh

echo "== Python SDK interop"
FERROHUB_BIN="$PWD/target/debug/ferrohub" bash interop/run.sh
