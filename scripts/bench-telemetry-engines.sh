#!/usr/bin/env bash
# Ferrohub only, the segment log against SQLite as the telemetry engine, 10 connections x 10 in
# flight, alternating engines, each on a fresh data directory, started as bench-telemetry.sh
# starts it (but waiting up to 60 s for it to come up). Needs a release build of ferrohub and
# ferrohub-bench. usage: scripts/bench-telemetry-engines.sh [SECONDS=6]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/release; work=$(mktemp -d target/quickbench.XXXXXX); work=$(cd "$work" && pwd); pid=
logs=$work
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
source scripts/bench-lib.sh
start_ferrohub() {
  local mqtt; mqtt=$(free_port)
  FERROHUB_LOG=warn "$bin/ferrohub" serve --data-dir "$1" --mqtt-bind "127.0.0.1:$mqtt" \
    --https-bind "127.0.0.1:$(free_port)" --amqp-bind 127.0.0.1:0 >>"$work/ferrohub.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -f "$1/hub.json" ] && break; sleep 0.1; done
  wait_port "$mqtt"
}
secs=${1:-6}
for round in 1; do
for engine in segment sqlite segment sqlite; do
  for load in "10 10"; do
    set -- $load
    data=$work/data-$engine
    FERROHUB_TELEMETRY_ENGINE=$engine start_ferrohub "$data"
    out=$work/$engine-$1x$2.log
    "$bin/ferrohub-bench" telemetry --data-dir "$data" --connections "$1" --inflight "$2" --seconds "$secs" >"$out" 2>&1 || cat "$out"
    stop_server; ls "$data" | tr '\n' ' '; echo
    echo "round $round $engine ${1}x${2}: $(grep -E '^(acked|PUBACK|server pid|machine)' "$out" | tr '\n' ' ')"
    rm -rf "$data"
  done
done
done
