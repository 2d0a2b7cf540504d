#!/usr/bin/env bash
# Soak test: one release Ferrohub on free loopback ports with a fresh data directory, under mixed
# traffic for HOURS (fractions allowed: 0.1 = 6 minutes), sampled every SOAK_INTERVAL seconds.
#
# Load (each a loop of short ferrohub-bench runs, so every run also re-registers its devices and
# reconnects them; device id prefixes keep the loops apart; rates are moderate on purpose, the
# point is stability over time on a shared 2-core machine, not peak throughput):
#   telemetry  10 connections, QoS 1, 2 in flight each, 300 msgs/s in all       (soak-tel-*)
#   c2d        50 devices, 50 REST sends/s, devices PUBACK at once              (soak-c2d-*)
#   methods    50 devices, 25 direct method calls/s                              (soak-met-*)
#   twin       50 devices, 100 reported patches/s (QoS 1)                        (soak-twin-*)
#   desired    scripts/soak.py desired: 10 service twin PATCHes/s (desired)     (soak-des-*)
#   connect    reconnect storm: 300 devices connect at once, hold 1 s, leave; every ~10 s
#   abuse      scripts/soak.py abuse: 5 malformed clients/s (garbage on both ports, broken TLS,
#              bad CONNECTs, bad REST requests and tokens) + 4 TLS sockets that never CONNECT
# Every SOAK_INTERVAL s scripts/soak.py samples the server (RSS, fds, threads, CPU), the load
# loops' latency figures and counts, and the WARN/ERROR lines of the server log into soak.csv;
# at the end it writes summary.json and soak.png (matplotlib from pip in soak-results/.venv;
# an SVG if that cannot be installed) and prints the summary.
#
# Fails (exit 1) when the server dies, when its RSS grows by more than 20% and more than 20 MiB
# from the first to the last quarter of the run (medians, after warm-up), or when its fd floor
# rises in every quarter (by more than 20 and 10%).
#
# usage: scripts/soak.sh [HOURS=1]
# env:   SOAK_OUT (results directory, default soak-results/<timestamp>), SOAK_INTERVAL (10)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
hours=${1:-1}
secs=$(python3 -c "import sys; print(max(60, round(float(sys.argv[1]) * 3600)))" "$hours")
interval=${SOAK_INTERVAL:-10}
# Warm-up: the first tenth of the run, at most 5 minutes; RSS "start" is taken after it.
warmup=$(( secs / 10 < 300 ? secs / 10 : 300 ))
target_dir=${CARGO_TARGET_DIR:-target}
bin=$(cd "$target_dir" 2>/dev/null && pwd || echo "$root/$target_dir")/release

out=${SOAK_OUT:-soak-results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/loops"; out=$(cd "$out" && pwd)
work=$out logs=$out pid=
data=$out/data
echo "soak: ${secs} s, sampling every ${interval} s, results in $out"

cargo build --release -q -p ferrohub -p ferrohub-bench
build=$(git log -1 --format='%h %cs' 2>/dev/null || echo "unknown commit")
[ -n "$(git status --porcelain -- crates 2>/dev/null)" ] && build="$build + uncommitted changes"

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
source scripts/bench-lib.sh

loop_pids=()
cleanup() {
  local p
  for p in "${loop_pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  for p in "${loop_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  pid=
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The plotting venv, made once and reused (in the background while the soak starts).
venv=$root/soak-results/.venv
( if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q matplotlib
  fi ) >"$out/venv.log" 2>&1 &
venv_job=$!

rm -rf "$data"
BENCH_SERVER_LOG=info start_ferrohub "$data"
echo "soak: ferrohub pid $pid ($build), log $out/ferrohub.log"
started=$(date +%s)
deadline=$(( started + secs ))

# loop NAME CMD...: runs CMD (with SECS replaced by this run's length) again and again until
# the deadline; stdout appended to loops/NAME.out (the RESULT lines), stderr to loops/NAME.err,
# one line per failed run to loops/NAME.failed. Runs in its own process group, so the trap can
# stop it with its child.
loop() {
  local name=$1; shift
  (
    while :; do
      local left=$(( deadline - $(date +%s) ))
      (( left < 8 )) && break
      local run=$(( left - 3 < RUN_SECS ? left - 3 : RUN_SECS ))
      local args=() a
      for a in "$@"; do args+=("${a//SECS/$run}"); done
      if ! "${args[@]}" >>"$out/loops/$name.out" 2>>"$out/loops/$name.err"; then
        echo "$(date +%s) $(tail -n 1 "$out/loops/$name.err")" >>"$out/loops/$name.failed"
        sleep 2
      fi
      [ -n "${PAUSE:-}" ] && sleep "$PAUSE"
    done
  ) &
  loop_pids+=($!)
}
hubargs=(--data-dir "$data")
set -m  # each background loop gets its own process group
RUN_SECS=60 loop telemetry "$bin/ferrohub-bench" telemetry "${hubargs[@]}" --prefix soak-tel- \
  --connections 10 --inflight 2 --rate 300 --seconds SECS --warmup-secs 0.5
RUN_SECS=60 loop c2d "$bin/ferrohub-bench" c2d "${hubargs[@]}" --prefix soak-c2d- --devices 50 \
  --rate 50 --secs SECS --warmup-secs 0.5 --http-inflight 16 --http-warm 4
RUN_SECS=60 loop methods "$bin/ferrohub-bench" methods "${hubargs[@]}" --prefix soak-met- \
  --devices 50 --rate 25 --secs SECS --warmup-secs 0.5 --http-inflight 16 --http-warm 4
RUN_SECS=60 loop twin "$bin/ferrohub-bench" twin-reported "${hubargs[@]}" --prefix soak-twin- \
  --devices 50 --rate 100 --secs SECS --warmup-secs 0.5
RUN_SECS=60 PAUSE=8 loop connect "$bin/ferrohub-bench" connect "${hubargs[@]}" --prefix soak-storm- \
  --devices 300 --hold-secs 1 --concurrency 32
python3 scripts/soak.py desired "$data" "$out/loops/desired.jsonl" --devices 20 --rate 10 \
  --interval "$interval" 2>>"$out/loops/desired.err" &
loop_pids+=($!)
python3 scripts/soak.py abuse "$data" "$out/loops/abuse.jsonl" --rate 5 --silent 4 \
  --interval "$interval" 2>>"$out/loops/abuse.err" &
loop_pids+=($!)
set +m

# The sampler runs in the foreground until the deadline; it exits 3 if the server vanished.
died=0
python3 scripts/soak.py sample "$pid" "$out" "$out/soak.csv" "$out/detail.json" \
  --interval "$interval" --until "$deadline" || died=$?
alive=1; kill -0 "$pid" 2>/dev/null || alive=0
if [ "$alive" = 0 ]; then
  wait "$pid" 2>/dev/null; code=$?
  echo "soak: FAIL: the server died (exit status $code) after $(( $(date +%s) - started )) s; see $out/ferrohub.log" >&2
fi

# Stop the load, then the server (a clean shutdown must work too).
for p in "${loop_pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
for p in "${loop_pids[@]}"; do wait "$p" 2>/dev/null || true; done
loop_pids=()
shutdown_ok=1
if [ "$alive" = 1 ]; then
  kill "$pid"
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "soak: the server did not stop within 30 s of SIGTERM" >&2; shutdown_ok=0; kill -9 "$pid"
  fi
  wait "$pid" 2>/dev/null || true
fi
pid=

wait "$venv_job" 2>/dev/null || true
plot=(--svg "$out/soak.svg")
"$venv/bin/python" -c 'import matplotlib' 2>/dev/null && plot=(--png "$out/soak.png")
py=python3; [ -x "$venv/bin/python" ] && py=$venv/bin/python
report_ok=0
"$py" scripts/soak.py report "$out/soak.csv" "$out/summary.json" "${plot[@]}" --warmup "$warmup" \
  --title "Ferrohub soak, $build, $(nproc) cores, $(python3 -c "print(f'{$secs/3600:g}')") h" \
  >"$out/summary.txt" || report_ok=$?

python3 - "$out" "$alive" "$shutdown_ok" <<'PY'
import json, sys
out, alive, shutdown_ok = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
s = json.load(open(f"{out}/summary.json"))
d = json.load(open(f"{out}/detail.json"))
mib = lambda k: k / 1024
r, f = s["rss_kib"], s["fds"]
print(f"\nsoak summary ({s['duration_s']:.0f} s, {s['samples']} samples, warm-up {s['warmup_s']} s)")
print(f"  server alive at the end   {'yes' if alive else 'NO'}; clean shutdown {'yes' if shutdown_ok else 'NO'}")
print(f"  RSS MiB  start {mib(r['start']):.1f}  end {mib(r['end']):.1f}  max {mib(r['max']):.1f}  "
      f"quarter medians {' / '.join(f'{mib(x):.1f}' for x in r['quarter_medians'])}")
print(f"  fds      start {f['start']:.0f}  end {f['end']:.0f}  max {f['max']:.0f}  "
      f"quarter floors {' / '.join(f'{x:.0f}' for x in f['quarter_floors'])}")
t = s["threads"]
print(f"  threads  start {t['start']:.0f}  end {t['end']:.0f}  max {t['max']:.0f}")
print(f"  server CPU {s['server_cpu_s']:.0f} s ({s['server_cores_avg']} cores on average)")
print("  operations (measured windows of the load runs; warm-ups of 0.5 s not counted):")
for k, v in s["ops"].items():
    runs = d["runs"].get(k)
    print(f"    {k:<10} {v:>10}" + (f"   ({runs} runs)" if runs else ""))
print("  latency (per-run figures; p50 = median of runs, p99 = median and worst run):")
for k, v in s["latency_ms"].items():
    print(f"    {k:<10} p50 {v['p50_median']:.2f} ms  p99 {v['p99_median']:.2f} ms (worst {v['p99_worst']:.2f}, "
          f"first quarter {v['p99_first_quarter']:.2f}, last quarter {v['p99_last_quarter']:.2f})")
print("  errors:")
for k, v in s["errors"].items():
    print(f"    {k:<18} {v}")
for k, v in sorted(d["load_failure_kinds"].items(), key=lambda x: -x[1])[:15]:
    print(f"      {v:>7}  {k}")
for k, v in sorted(d["desired_error_kinds"].items(), key=lambda x: -x[1]):
    print(f"      {v:>7}  desired: {k}")
bad = {k: v for k, v in d["abuse"].items() if v[1]}
print(f"  malformed clients: {sum(v[0] + v[1] for v in d['abuse'].values())} attempts over "
      f"{len(d['abuse'])} kinds, {sum(v[1] for v in d['abuse'].values())} not refused as expected")
for k, v in sorted(bad.items()):
    print(f"      {v[1]:>7}  unexpected: {k}")
print("  server log WARN/ERROR lines, by message:")
for k, v in sorted(d["log_messages"].items(), key=lambda x: -x[1])[:20]:
    print(f"      {v:>7}  {k}")
print(f"  checks: RSS growth {'ok' if s['checks']['rss_growth_ok'] else 'FAIL'}, "
      f"fd growth {'ok' if s['checks']['fd_growth_ok'] else 'FAIL'}")
PY
echo "soak: csv $out/soak.csv, plot $(ls "$out"/soak.png "$out"/soak.svg 2>/dev/null | head -1), summary $out/summary.json"
rm -rf "$data"
if [ "$alive" = 0 ] || [ "$report_ok" != 0 ]; then
  echo "soak: FAIL" >&2; exit 1
fi
echo "soak: PASS"
