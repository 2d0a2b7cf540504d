#!/usr/bin/env bash
# How fast each external routing endpoint type delivers: the telemetry benchmark (ferrohub-bench
# telemetry, QoS 1, 10 connections x 10 in flight, 256-byte bodies) on a fresh Ferrohub per
# measurement, with one route sending every message to one endpoint, in four cases taken in turn
# within each run:
#   stream   a custom stream endpoint inside the hub (no delivery: the ingest baseline);
#   storage  Avro files under <data-dir>/storage/bench/, a 1 s window;
#   nats     JetStream publishes to a real nats-server -js on loopback (file storage), 64 in flight;
#   webhook  POSTs of JSON arrays of 100 messages to a Python ThreadingHTTPServer on loopback
#            (answers 200 at once; it is the bottleneck long before the hub is).
# For each it prints the acked ingest rate, what the endpoint delivered while ingest ran
# (delivered / ingest time), how long it took to drain the backlog after the last PUBACK, and
# the overall delivery rate (everything delivered / time until the last delivery).
# usage: scripts/bench-endpoints.sh [SECONDS=10] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; runs=${2:-3}
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/release
logs=target/bench-endpoints-last

command -v nats-server >/dev/null || { echo "nats-server is needed (apt-get install nats-server)" >&2; exit 2; }
cargo build --release -q -p ferrohub -p ferrohub-bench
build=$(git log -1 --format='%h %cs' 2>/dev/null || echo "unknown commit")
if [ -n "$(git status --porcelain -- crates 2>/dev/null)" ]; then
  build="$build + uncommitted changes"
fi

mkdir -p target
work=$(mktemp -d target/bench-endpoints.XXXXXX); work=$(cd "$work" && pwd); pid=; peer=
cleanup() {
  [ -n "$peer" ] && kill "$peer" 2>/dev/null && wait "$peer" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$logs"; mkdir -p "$logs"; cp "$work"/*.log "$logs"/ 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
source scripts/bench-lib.sh

stop_peer() { [ -n "$peer" ] && { kill "$peer" 2>/dev/null || true; wait "$peer" 2>/dev/null || true; }; peer=; }

# A JetStream stream capturing bench.> (over NATS' text protocol: no client library needed).
nats_stream() { # port
  python3 - "$1" <<'PY'
import json, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
f = s.makefile("rb")
f.readline()  # INFO
body = json.dumps({"name": "BENCH", "subjects": ["bench.>"], "storage": "file"}).encode()
s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nSUB _INBOX.bench 1\r\n'
          + b"PUB $JS.API.STREAM.CREATE.BENCH _INBOX.bench %d\r\n" % len(body) + body + b"\r\n")
while True:
    line = f.readline()
    if line.startswith(b"MSG"):
        reply = f.read(int(line.split()[-1]) + 2)
        if b'"error"' in reply:
            sys.exit(f"creating the stream failed: {reply!r}")
        break
    if line.startswith(b"PING"):
        s.sendall(b"PONG\r\n")
PY
}

# Polls the endpoint's health until `delivered` has not moved for 3 s (at most 120 s) and prints
# the delivered counts at the end of ingest and at the last delivery, with their times.
drain() { # data-dir endpoint t0 t1
  python3 - "$@" <<'PY'
import base64, hashlib, hmac, json, ssl, sys, time, urllib.parse, urllib.request
data, name, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
info = json.load(open(f"{data}/hub.json"))
cs = dict(p.split("=", 1) for p in info["owner_connection_string"].split(";"))
ctx = ssl.create_default_context(cafile=info["ca_file"])
def delivered():
    sr = urllib.parse.quote_plus(cs["HostName"]); se = str(int(time.time()) + 600)
    sig = base64.b64encode(hmac.new(base64.b64decode(cs["SharedAccessKey"]),
                                    f"{sr}\n{se}".encode(), hashlib.sha256).digest()).decode()
    tok = (f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}"
           f"&skn={cs['SharedAccessKeyName']}")
    req = urllib.request.Request(
        f"https://localhost:{info['https_port']}/ferrohub/routing/endpoints/{name}/health"
        "?api-version=2021-04-12", headers={"Authorization": tok})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.load(r)["delivered"]
at_end = delivered()
last, last_t, deadline = at_end, time.time(), time.time() + 120
while time.time() < deadline:
    time.sleep(0.2)
    d = delivered()
    if d != last:
        last, last_t = d, time.time()
    elif time.time() - last_t >= 3:
        break
print(json.dumps({"delivered_at_end": at_end, "delivered": last,
                  "ingest_s": t1 - t0, "drain_s": max(0.0, last_t - t1), "until_last_s": last_t - t0}))
PY
}

results=$work/results.jsonl
: >"$results"
measure() { # case run
  local case=$1 run=$2 data=$work/data-$1-$2 out=$work/$1-$2.log port t0 t1 drained
  wait_quiet
  start_ferrohub "$data"
  local cli=("$bin/ferrohub")
  case $case in
    stream) "${cli[@]}" endpoint add bench --type stream --data-dir "$data" >/dev/null ;;
    storage)
      "${cli[@]}" endpoint add bench --type storage --container bench --batch-frequency 1s \
        --data-dir "$data" >/dev/null ;;
    nats)
      port=$(free_port)
      nats-server -js -a 127.0.0.1 -p "$port" -sd "$work/nats-$run" >>"$work/nats.log" 2>&1 &
      peer=$!; wait_port "$port"; nats_stream "$port"
      "${cli[@]}" endpoint add bench --type nats --url "nats://127.0.0.1:$port" \
        --subject bench.telemetry --stream BENCH --data-dir "$data" >/dev/null ;;
    webhook)
      port=$(free_port)
      python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$port" \
        >>"$work/webhook.log" 2>&1 &
      peer=$!; wait_port "$port"
      "${cli[@]}" endpoint add bench --type webhook --url "http://127.0.0.1:$port/in" --batch 100 \
        --data-dir "$data" >/dev/null ;;
  esac
  "${cli[@]}" route add all --endpoint bench --data-dir "$data" >/dev/null
  t0=$(date +%s.%N)
  if ! "$bin/ferrohub-bench" telemetry --data-dir "$data" --connections 10 --inflight 10 \
      --seconds "$secs" >"$out" 2>&1; then
    cat "$out" >&2; return 1
  fi
  t1=$(date +%s.%N)
  if [ "$case" = stream ]; then
    drained='{}'
  else
    drained=$(drain "$data" bench "$t0" "$t1")
  fi
  stop_server; stop_peer; rm -rf "$data" "$work/nats-$run"
  line=$(grep '^RESULT ' "$out"); line=${line#RESULT }
  echo "$case-$run: $(grep -E '^acked' "$out" | tr '\n' ' ') $drained" >&2
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["case"]=sys.argv[2]; r.update(json.loads(sys.argv[3])); print(json.dumps(r))' \
    "$line" "$case" "$drained" >>"$results"
}

for run in $(seq "$runs"); do
  for case in stream storage nats webhook; do
    measure "$case" "$run"
  done
done

python3 - "$results" "$secs" "$runs" "$build" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
secs, runs, build = sys.argv[2], int(sys.argv[3]), sys.argv[4]
def med(case, get):
    vals = []
    for r in rows:
        if r["case"] != case:
            continue
        try:
            vals.append(get(r))
        except (KeyError, ZeroDivisionError):
            pass
    return statistics.median(vals) if vals else float("nan")
print(f"\nendpoints: Ferrohub {build}; every message routed to one endpoint; 10 connections x 10 "
      f"in flight, QoS 1, 256-byte bodies, TLS 1.3, loopback, {secs} s measured after 1 s "
      f"warm-up, median of {runs} runs")
print(f"{'case':<8} {'acked msgs/s':>12} {'vs stream':>9} {'delivered/s in ingest':>21} "
      f"{'drain s':>8} {'delivered/s overall':>19} {'delivered':>10}")
base = med("stream", lambda r: r["acked_per_sec"])
for case in ["stream", "storage", "nats", "webhook"]:
    acked = med(case, lambda r: r["acked_per_sec"])
    during = med(case, lambda r: r["delivered_at_end"] / r["ingest_s"])
    overall = med(case, lambda r: r["delivered"] / r["until_last_s"])
    print(f"{case:<8} {acked:12.0f} {acked / base:8.3f}x {during:21.0f} "
          f"{med(case, lambda r: r['drain_s']):8.1f} {overall:19.0f} "
          f"{med(case, lambda r: r['delivered']):10.0f}")
for r in rows:
    if r.get("connection_errors") or r.get("unacked_at_end"):
        print(f"warning: {r['case']}: {r['connection_errors']} connections failed, "
              f"{r['unacked_at_end']} PUBLISHes never acknowledged")
    if r.get("contended"):
        print(f"warning: other processes used CPU during {r['case']}: its figures are suspect")
    if r["case"] != "stream" and r.get("delivered", 0) < r.get("acked", 0):
        print(f"warning: {r['case']}: delivered {r['delivered']} < acked {r['acked']} after draining")
PY
echo "bench output: $logs/"
