#!/usr/bin/env bash
# Connect benchmark: a fresh release server per run on loopback, N devices with real SAS tokens
# over TLS (no session resumption), held idle, then closed; prints each run's RESULT line and the
# medians, including the server's RSS some seconds after every connection closed.
# usage: scripts/bench-connect.sh [DEVICES=10000] [RUNS=3]
# Extra arguments for `ferrohub-bench connect` go in BENCH_ARGS (e.g. BENCH_ARGS="--closed-idle-secs 10").
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-10000}; runs=${2:-3}
cargo build --release -q -p ferrohub -p ferrohub-bench
bin=target/release
work=$(mktemp -d); pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
results=()
for run in $(seq "$runs"); do
  data="$work/data$run"
  FERROHUB_LOG=warn "$bin/ferrohub" serve --data-dir "$data" --mqtt-bind "127.0.0.1:$(free_port)" \
    --https-bind "127.0.0.1:$(free_port)" --amqp-bind 127.0.0.1:0 >"$work/server$run.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do [ -f "$data/hub.json" ] && break; sleep 0.1; done
  line=$("$bin/ferrohub-bench" connect --data-dir "$data" --devices "$devices" --hold-secs 3 ${BENCH_ARGS:-} | grep '^RESULT ')
  echo "run $run: $line"
  results+=("${line#RESULT }")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done
printf '%s\n' "${results[@]}" > "$work/results.jsonl"
python3 - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(k):
    vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
    return statistics.median(vals) if vals else float("nan")
print(f"median of {len(rows)} runs, {rows[0]['devices']} devices:")
print(f"  connects/s                         {med('connects_per_sec'):10.0f}")
print(f"  connects per server CPU-second     {med('connects_per_server_cpu_sec'):10.0f}   (target >= 5000)")
print(f"  server RSS per idle TLS connection {med('server_rss_per_conn_kib'):10.1f} KiB (target <= 10)")
print(f"  server RSS before connecting       {med('server_rss_before_kib') / 1024:10.1f} MiB")
print(f"  server RSS with all connected idle {med('server_rss_after_kib') / 1024:10.1f} MiB")
print(f"  server RSS {rows[0].get('closed_idle_secs', '?')} s after all closed   {med('server_rss_closed_kib') / 1024:10.1f} MiB")
print(f"  connect latency p99 (ms)           {statistics.median(r['latency_ms']['p99'] for r in rows):10.1f}")
print(f"  failed connects (max of runs)      {max(r['failed'] for r in rows):10d}")
PY
