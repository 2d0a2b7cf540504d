#!/usr/bin/env bash
# A twin-update job over N devices (default 10,000) on a fresh release server on loopback:
# registers the devices with `ferrohub device import` (bulk, 100 per call), schedules one
# `scheduleUpdateTwin` job over all of them with `ferrohub job schedule-twin`, and polls
# `ferrohub job show` until it is completed; prints twins per second (from the job's own start
# and end times) and the server's CPU per twin. Every device must have succeeded.
# usage: scripts/bench-job.sh [DEVICES=10000]
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-10000}
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/release
logs=target/bench-job-last

cargo build --release -q -p ferrohub
build=$(git log -1 --format='%h %cs' 2>/dev/null || echo "unknown commit")

mkdir -p target
work=$(mktemp -d target/bench-job.XXXXXX); work=$(cd "$work" && pwd); pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$logs"; mkdir -p "$logs"; cp "$work"/*.log "$logs"/ 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
source scripts/bench-lib.sh

data=$work/data
start_ferrohub "$data"
fh() { "$bin/ferrohub" "$@" --data-dir "$data"; }

python3 -c "
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({'id': f'job-{i:06d}', 'importMode': 'create', 'tags': {'fleet': 'bench'}}))
" "$devices" >"$work/devices.jsonl"
t0=$(date +%s.%N)
fh device import "$work/devices.jsonl" >"$work/import.log"
t1=$(date +%s.%N)
echo "registered $devices devices in $(python3 -c "print(f'{$t1 - $t0:.1f}')") s (bulk import)"

cpu_before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
fh job schedule-twin bench-job --where "tags.fleet = 'bench'" \
  --patch '{"properties": {"desired": {"firmware": "2.1"}}}' -o json >"$work/schedule.log"
for _ in $(seq 3000); do
  fh job show bench-job -o json >"$work/job.json"
  status=$(python3 -c "import json; print(json.load(open('$work/job.json'))['status'])")
  case $status in completed|failed|cancelled) break ;; esac
  sleep 0.2
done
cpu_after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
ticks=$(getconf CLK_TCK)

python3 - "$work/job.json" "$devices" "$((cpu_after - cpu_before))" "$ticks" "$build" <<'PY'
import json, sys
from datetime import datetime
job = json.load(open(sys.argv[1]))
devices, cpu_ticks, hz, build = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def t(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00"))
stats = job.get("deviceJobStatistics", {})
secs = (t(job["endTime"]) - t(job["startTime"])).total_seconds() if job.get("endTime") else float("nan")
cpu = cpu_ticks / hz
print(f"\nFerrohub {build}; twin-update job over {devices} devices, fresh release server, loopback")
print(f"  status {job['status']}: {stats.get('succeededCount')} succeeded, {stats.get('failedCount')} failed "
      f"of {stats.get('deviceCount')}")
print(f"  job start -> end: {secs:.2f} s = {devices / secs:.0f} twins/s")
print(f"  server CPU while the job ran (incl. the CLI's polls): {cpu:.2f} s = {cpu / devices * 1e6:.0f} µs per twin")
ok = job["status"] == "completed" and stats.get("succeededCount") == devices
print("  every device updated: " + ("yes" if ok else "NO"))
sys.exit(0 if ok else 1)
PY
