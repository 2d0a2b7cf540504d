#!/usr/bin/env bash
# Follows the README quickstart as a new user would: start the server, create a device, get a
# SAS token, publish telemetry with mosquitto_pub over TLS with the printed CA, receive C2D with
# mosquitto_sub -t '#'. Also checks that a wrong token is refused. Uses free loopback ports and its own data directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${FERROHUB_BIN:-$PWD/target/debug/ferrohub}"
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
mqtt_port=$(free_port); https_port=$(free_port)
data="$work/ferrohub-data"

"$bin" serve --data-dir "$data" --mqtt-bind "127.0.0.1:$mqtt_port" --https-bind "127.0.0.1:$https_port" --amqp-bind 127.0.0.1:0 \
  >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 100); do [ -f "$data/hub.json" ] && break; sleep 0.1; done
[ -f "$data/hub.json" ] || { echo "server did not start"; cat "$work/server.log"; exit 1; }

passed=0; failed=0
check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@" >"$work/check.out" 2>&1; then passed=$((passed+1)); echo "ok   $name"
  else failed=$((failed+1)); echo "FAIL $name"; sed 's/^/     /' "$work/check.out"; fi
}

check "banner prints the CA, the owner connection string and a create command" \
  grep -q "ferrohub device create" "$work/server.out"
grep -q "SharedAccessKeyName=iothubowner" "$work/server.out" || { echo "no owner connection string in banner"; failed=$((failed+1)); }

check "device create" "$bin" device create my-device --data-dir "$data"
token=$("$bin" sas-token --device my-device --data-dir "$data")
ca="$data/certs/ca.pem"

publish() {
  mosquitto_pub -h localhost -p "$mqtt_port" --cafile "$ca" -V mqttv311 \
    -i my-device -u "localhost/my-device/?api-version=2021-04-12" -P "$1" \
    -t "devices/my-device/messages/events/" -m '{"temperature": 21.5}' -q 1 -d
}
telemetry_acknowledged() { publish "$token" | tee /dev/stderr | grep -q "received PUBACK"; }
check "mosquitto_pub telemetry is acknowledged" telemetry_acknowledged
wrong_token_refused() { ! publish "${token%?}x"; }
check "a wrong token is refused" wrong_token_refused
# Microsoft's mosquitto_sub sample for IoT Hub receives C2D with `-t "#"`. The message is sent
# first: it waits in the device's queue and goes out as soon as the subscription is granted.
c2d_through_hash() {
  "$bin" c2d send my-device --data "hello through #" --data-dir "$data" &&
  mosquitto_sub -h localhost -p "$mqtt_port" --cafile "$ca" -V mqttv311 \
    -i my-device -u "localhost/my-device/?api-version=2021-04-12" -P "$token" \
    -t "#" -q 1 -C 1 -W 10 -v | tee /dev/stderr | grep -q "^devices/my-device/messages/devicebound/.* hello through #$"
}
check "mosquitto_sub -t '#' receives the device's C2D" c2d_through_hash
logged() { grep -q "device connected.*identity=my-device" "$work/server.log" && grep -q "connection refused.*401003" "$work/server.log"; }
check "the server logs the connect and the refusal" logged

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
