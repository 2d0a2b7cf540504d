# Shell helpers the benchmark scripts share; sourced, not run. The caller sets `bin` (release
# binaries), `work` (scratch directory), `logs` (where logs end up) and `pid` (the server under
# test, empty when none).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done
  echo "nothing listens on 127.0.0.1:$1; see $logs/" >&2; return 1
}

stop_server() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }

# Starts a Ferrohub on free loopback ports with data dir $1 and waits until it accepts MQTT.
# BENCH_SERVER_LOG sets its log filter (default warn).
start_ferrohub() {
  local mqtt; mqtt=$(free_port)
  FERROHUB_LOG=${BENCH_SERVER_LOG:-warn} "$bin/ferrohub" serve --data-dir "$1" --mqtt-bind "127.0.0.1:$mqtt" \
    --https-bind "127.0.0.1:$(free_port)" --amqp-bind 127.0.0.1:0 >>"$work/ferrohub.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do [ -f "$1/hub.json" ] && break; sleep 0.1; done
  [ -f "$1/hub.json" ] || { echo "ferrohub wrote no $1/hub.json; see $logs/ferrohub.log" >&2; return 1; }
  wait_port "$mqtt"
}

# Waits (up to two minutes) until the CPUs are nearly idle, so a build or another benchmark
# sharing the machine does not land in a measurement.
wait_quiet() {
  local a b busy idle
  for _ in $(seq 60); do
    read -ra a </proc/stat; sleep 2; read -ra b </proc/stat
    # cpu user nice system idle iowait irq softirq steal
    busy=$(( b[1]+b[2]+b[3]+b[6]+b[7]+b[8] - a[1]-a[2]-a[3]-a[6]-a[7]-a[8] ))
    idle=$(( b[4]+b[5] - a[4]-a[5] ))
    (( busy * 10 < busy + idle )) && return
  done
  echo "warning: the machine stayed busy; measuring anyway" >&2
}
