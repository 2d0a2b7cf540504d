#!/usr/bin/env bash
# Crash loop: SIGKILL a release Ferrohub under full write load TRIALS times, restart it on the
# same data directory each time, and check that nothing it acknowledged was lost.
#
# One data directory and one pair of loopback ports for the whole campaign (each restart finds
# the files the previous kill left). Each trial:
#   1. `ferrohub-bench crash-writer` (device ids prefixed ct<trial>-) registers its devices and
#      starts the load: 8 devices publishing QoS 1 telemetry (16 in flight each, 4,000 msgs/s in
#      all), 8 devices publishing reported patches (400/s), C2D sends over REST (300/s, to 100
#      devices that never connect, so each acknowledged send must still be queued) and registry
#      creates over REST (100/s). Each acknowledgement is appended to acks/trial-N.log the moment
#      it arrives: PUBACK, 204 on $iothub/twin/res, a 2xx.
#   2. After a random 0.5-6 s of load the hub gets SIGKILL; the writer is stopped 0.5 s later.
#   3. The hub is restarted on the same data directory and must listen within 30 s (else a
#      restart failure).
#   4. `ferrohub-bench crash-check` reads it all back: the event stream from the trial's start
#      (every PUBACKed seq present), each C2D target's queue over MQTT (every 2xx message id
#      there), each twin (reported seq and $version at least the last acknowledged ones), each
#      created device (GET 200).
# At the end a final check reads back every trial's telemetry, twins and devices again (C2D
# queues were consumed by the per-trial checks), then prints the totals. Exit 1 on any lost
# write, restart failure or failed check.
#
# usage: scripts/crash-loop.sh [TRIALS=100]
# env:   CRASH_OUT (results directory, default soak-results/crash-<timestamp>),
#        CRASH_MIN_MS / CRASH_MAX_MS (the kill moment's range, default 500 / 6000)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
trials=${1:-100}
min_ms=${CRASH_MIN_MS:-500}; max_ms=${CRASH_MAX_MS:-6000}
target_dir=${CARGO_TARGET_DIR:-target}
bin=$(cd "$target_dir" 2>/dev/null && pwd || echo "$root/$target_dir")/release
out=${CRASH_OUT:-soak-results/crash-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/acks"; out=$(cd "$out" && pwd)
data=$out/data
work=$out logs=$out
echo "crash-loop: $trials trials, results in $out"

cargo build --release -q -p ferrohub -p ferrohub-bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
source scripts/bench-lib.sh
mqtt_port=$(free_port); https_port=$(free_port)

pid= wpid=
cleanup() {
  [ -n "$wpid" ] && kill "$wpid" 2>/dev/null && wait "$wpid" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  pid= wpid=
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts the hub on the campaign's data directory and ports; 0 once both ports accept.
start_hub() {
  FERROHUB_LOG=info "$bin/ferrohub" serve --data-dir "$data" \
    --mqtt-bind "127.0.0.1:$mqtt_port" --https-bind "127.0.0.1:$https_port" --amqp-bind 127.0.0.1:0 \
    --c2d-ttl-secs 172800 >>"$out/ferrohub.log" 2>&1 &
  pid=$!
  local port
  for port in "$mqtt_port" "$https_port"; do
    for _ in $(seq 300); do
      kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; echo "the hub exited with status $?" >&2; pid=; return 1; }
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && continue 2
      sleep 0.1
    done
    echo "the hub did not listen on $port within 30 s" >&2; return 1
  done
  for _ in $(seq 100); do [ -f "$data/hub.json" ] && return 0; sleep 0.1; done
  echo "the hub wrote no hub.json" >&2; return 1
}

rm -rf "$data"
start_hub || { echo "crash-loop: the hub does not start at all; see $out/ferrohub.log" >&2; exit 1; }
campaign_start=$(date -u -d '-2 sec' +%Y-%m-%dT%H:%M:%SZ)
checks=$out/checks.jsonl; : >"$checks"
restart_failures=0 check_errors=0 writer_errors=0

for trial in $(seq "$trials"); do
  log=$out/acks/trial-$trial.log; ready=$out/ready
  rm -f "$ready"
  since=$(date -u -d '-2 sec' +%Y-%m-%dT%H:%M:%SZ)
  "$bin/ferrohub-bench" crash-writer --data-dir "$data" --log "$log" --prefix "ct$trial-" \
    --ready-file "$ready" >>"$out/writer.log" 2>&1 &
  wpid=$!
  for _ in $(seq 300); do [ -f "$ready" ] && break; kill -0 "$wpid" 2>/dev/null || break; sleep 0.1; done
  if [ ! -f "$ready" ]; then
    echo "trial $trial: the writer did not start its load; see $out/writer.log" >&2
    writer_errors=$((writer_errors + 1))
  fi
  load_ms=$(( min_ms + (RANDOM * 32768 + RANDOM) % (max_ms - min_ms + 1) ))
  sleep "$(printf '%d.%03d' $((load_ms / 1000)) $((load_ms % 1000)))"
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true; pid=
  echo "--- trial $trial: SIGKILL after $load_ms ms of load" >>"$out/ferrohub.log"
  sleep 0.5
  kill "$wpid" 2>/dev/null || true; wait "$wpid" 2>/dev/null || true; wpid=

  t0=$(date +%s%N)
  if ! start_hub 2>>"$out/restart-errors.log"; then
    restart_failures=$((restart_failures + 1))
    echo "trial $trial: RESTART FAILED; see $out/restart-errors.log and $out/ferrohub.log" >&2
    break
  fi
  restart_ms=$(( ($(date +%s%N) - t0) / 1000000 ))

  line=$("$bin/ferrohub-bench" crash-check --data-dir "$data" --log "$log" --since "$since" \
    2>>"$out/check.log" | grep '^CHECK ' || true)
  if [ -z "$line" ]; then
    check_errors=$((check_errors + 1))
    echo "trial $trial: the check did not finish; see $out/check.log" >&2
    continue
  fi
  line=${line#CHECK }
  python3 - "$trial" "$load_ms" "$restart_ms" "$line" >>"$checks" <<'PY'
import json, sys
trial, load_ms, restart_ms, c = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
c.update(trial=trial, load_ms=load_ms, restart_ms=restart_ms)
print(json.dumps(c))
k = lambda n: f"{c[n]['acked']}" + (f" (LOST {c[n]['lost']})" if c[n]["lost"] else "")
print(f"trial {trial:>3}: kill after {load_ms / 1000:4.1f} s, restart {restart_ms:5d} ms; acked telemetry "
      f"{k('telemetry')}, c2d {k('c2d')}, twin {k('twin')}, creates {k('registry')}; lost {c['lost']}",
      file=sys.stderr)
for kind in ("telemetry", "c2d", "twin", "registry"):
    for e in c[kind]["examples"]:
        print(f"    lost: {e}", file=sys.stderr)
PY
  line=
done

final=
if [ "$restart_failures" = 0 ] && [ -s "$checks" ]; then
  echo "crash-loop: final check of every trial's telemetry, twins and devices" >&2
  final=$("$bin/ferrohub-bench" crash-check --data-dir "$data" --log "$out"/acks/trial-*.log \
    --since "$campaign_start" --skip-c2d --idle-secs 10 2>>"$out/check.log" | grep '^CHECK ' || true)
  final=${final#CHECK }
  [ -n "$final" ] || check_errors=$((check_errors + 1))
fi
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=

python3 - "$checks" "$trials" "$restart_failures" "$check_errors" "$writer_errors" "${final:-null}" "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
trials, restart_failures, check_errors, writer_errors = map(int, sys.argv[2:6])
final = json.loads(sys.argv[6])
kinds = ("telemetry", "c2d", "twin", "registry")
acked = {k: sum(r[k]["acked"] for r in rows) for k in kinds}
lost = {k: sum(r[k]["lost"] for r in rows) for k in kinds}
print(f"\ncrash-loop totals: {len(rows)} of {trials} trials checked")
for k in kinds:
    print(f"  {k:<10} acknowledged {acked[k]:>9}   lost {lost[k]}")
print(f"  telemetry duplicates read back {sum(r['telemetry_duplicates'] for r in rows)}")
if rows:
    loads = sorted(r["load_ms"] for r in rows)
    rest = sorted(r["restart_ms"] for r in rows)
    print(f"  kill moment {loads[0] / 1000:.1f}-{loads[-1] / 1000:.1f} s into the load; restart to "
          f"listening: median {rest[len(rest) // 2]} ms, max {rest[-1]} ms")
if final:
    fl = {k: final[k]["lost"] for k in ("telemetry", "twin", "registry")}
    print(f"  final re-check of all trials: telemetry {final['telemetry']['acked']} acked, "
          f"{fl['telemetry']} lost; twins {final['twin']['acked']}, {fl['twin']} lost; devices "
          f"{final['registry']['acked']}, {fl['registry']} lost")
    for k in ("telemetry", "twin", "registry"):
        for e in final[k]["examples"]:
            print(f"    lost: {e}")
    lost_final = sum(fl.values())
else:
    lost_final = 0
    print("  final re-check: not run or did not finish")
print(f"  lost writes       {sum(lost.values()) + lost_final}")
print(f"  restart failures  {restart_failures}")
print(f"  check errors      {check_errors}")
print(f"  writer errors     {writer_errors}")
summary = dict(trials=trials, checked=len(rows), acked=acked, lost=lost, final=final,
               restart_failures=restart_failures, check_errors=check_errors, writer_errors=writer_errors)
json.dump(summary, open(f"{sys.argv[7]}/summary.json", "w"), indent=1)
ok = sum(lost.values()) + lost_final == 0 and restart_failures == 0 and check_errors == 0 \
    and len(rows) == trials and final is not None
print("crash-loop: " + ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
PY
