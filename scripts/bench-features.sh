#!/usr/bin/env bash
# What IoT Plug and Play conformance and message routing cost ingest: the telemetry benchmark
# (ferrohub-bench telemetry, QoS 1, 10 connections x 10 in flight, 256-byte JSON bodies
# `{"temperature":21.5}` padded with spaces, `$.ct=application/json`, `$.ce=utf-8`, an
# application property `level=info`) on a fresh Ferrohub per measurement, in three cases taken
# in turn within each run:
#   plain        no model id, no route (the passthrough ingest path);
#   conformance  every device connects with model-id dtmi:com:example:Thermostat;1 (in the
#                repository), so the hub checks every message against the model;
#   routes10     ten routes on DeviceMessages whose conditions read application properties and
#                `$body`: nine never match, one matches and names `events`, so every message is
#                still stored once and only evaluation is added.
# usage: scripts/bench-features.sh [SECONDS=10] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; runs=${2:-3}
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/release
logs=target/bench-features-last
model_id='dtmi:com:example:Thermostat;1'

cargo build --release -q -p ferrohub -p ferrohub-bench
build=$(git log -1 --format='%h %cs' 2>/dev/null || echo "unknown commit")
if [ -n "$(git status --porcelain -- crates 2>/dev/null)" ]; then
  build="$build + uncommitted changes"
fi

mkdir -p target
work=$(mktemp -d target/bench-features.XXXXXX); work=$(cd "$work" && pwd); pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$logs"; mkdir -p "$logs"; cp "$work"/*.log "$logs"/ 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
source scripts/bench-lib.sh

# Nine conditions that never hold for the bench's messages, then one that always does.
routes=(
  "\$body.temperature > 100"
  "level = 'critical'"
  "level = 'warning' AND \$body.temperature > 30"
  "\$body.temperature < -40"
  "site = 'north'"
  "\$body.humidity > 90"
  "level = 'debug' OR level = 'trace'"
  "\$body.temperature = 0 AND level <> 'info'"
  "\$contentType <> 'application/json'"
  "level = 'info' AND \$body.temperature >= 0"
)

results=$work/results.jsonl
: >"$results"
measure() { # case run
  local case=$1 run=$2 data=$work/data-$1-$2 out=$work/$1-$2.log extra=() i checked
  wait_quiet
  start_ferrohub "$data"
  "$bin/ferrohub" model add examples/thermostat/Thermostat.json --data-dir "$data" >/dev/null
  case $case in
    conformance) extra=(--model-id "$model_id") ;;
    routes10)
      for i in "${!routes[@]}"; do
        "$bin/ferrohub" route add "r$i" --condition "${routes[$i]}" --endpoint events \
          --data-dir "$data" >/dev/null
      done ;;
  esac
  if ! "$bin/ferrohub-bench" telemetry --data-dir "$data" --connections 10 --inflight 10 \
      --json-body --property level=info "${extra[@]}" --seconds "$secs" >"$out" 2>&1; then
    cat "$out" >&2; return 1
  fi
  # What the checker saw: every device's count of checked messages and findings.
  checked=$(for i in $(seq 0 9); do
    "$bin/ferrohub" model check "bench-$i" --data-dir "$data" -o json
  done | python3 -c '
import json, sys
dec, text, pos, checked, findings = json.JSONDecoder(), sys.stdin.read(), 0, 0, 0
while pos < len(text.strip()):
    r, pos = dec.raw_decode(text, pos)
    while pos < len(text) and text[pos].isspace(): pos += 1
    checked += r.get("checked", 0); findings += sum(r.get("findings", {}).values())
print(json.dumps({"checked": checked, "findings": findings}))')
  stop_server; rm -rf "$data"
  line=$(grep '^RESULT ' "$out"); line=${line#RESULT }
  echo "$case-$run: $(grep -E '^(acked|PUBACK)' "$out" | tr '\n' ' ')" >&2
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["case"]=sys.argv[2]; r.update(json.loads(sys.argv[3])); print(json.dumps(r))' \
    "$line" "$case" "$checked" >>"$results"
}

for run in $(seq "$runs"); do
  for case in plain conformance routes10; do
    measure "$case" "$run"
  done
done

python3 - "$results" "$secs" "$runs" "$build" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
secs, runs, build = sys.argv[2], int(sys.argv[3]), sys.argv[4]
def med(case, get):
    vals = [get(r) for r in rows if r["case"] == case]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else float("nan")
rate = lambda r: r["acked_per_sec"]
per_cpu = lambda r: r["msgs_per_server_cpu_sec"]
print(f"\nfeatures: Ferrohub {build}; 10 connections x 10 in flight, QoS 1, 256-byte JSON bodies, "
      f"TLS 1.3, loopback, {secs} s measured after 1 s warm-up, median of {runs} runs")
print(f"{'case':<12} {'acked msgs/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'msgs/srv CPU-s':>14} "
      f"{'vs plain':>8} {'checked':>10} {'findings':>8}")
base = med("plain", rate)
for case in ["plain", "conformance", "routes10"]:
    print(f"{case:<12} {med(case, rate):12.0f} {med(case, lambda r: r['latency_ms']['p50']):8.3f} "
          f"{med(case, lambda r: r['latency_ms']['p99']):8.3f} {med(case, per_cpu):14.0f} "
          f"{med(case, rate) / base:7.3f}x {med(case, lambda r: r['checked']):10.0f} "
          f"{med(case, lambda r: r['findings']):8.0f}")
for case, floor in [("conformance", 0.95), ("routes10", 0.90)]:
    r = med(case, rate) / base
    print(f"{case}: {r:.3f}x of plain in acked msgs/s (target >= {floor}x: "
          f"{'met' if r >= floor else 'NOT met'})")
# Every message of the conformance run (warm-up and drain included) should have been checked;
# fewer means the checker fell behind and dropped observations, which makes it look cheaper.
for r in rows:
    if r["case"] == "conformance" and r["checked"] < r["acked"]:
        print(f"warning: conformance run checked {r['checked']} of at least {r['acked']} messages "
              "(the checker's queue overflowed and dropped the rest)")
    if r["case"] == "conformance" and r["findings"]:
        print(f"warning: {r['findings']} findings on conforming messages")
    if r["connection_errors"] or r["unacked_at_end"]:
        print(f"warning: {r['case']}: {r['connection_errors']} connections failed, "
              f"{r['unacked_at_end']} PUBLISHes never acknowledged")
    if r["contended"]:
        print(f"warning: other processes used CPU during {r['case']}: its figures are suspect")
PY
echo "bench output: $logs/"
