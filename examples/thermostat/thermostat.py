#!/usr/bin/env python3
"""An IoT Plug and Play thermostat on the official Azure IoT device SDK for Python
(azure-iot-device), unmodified: it runs against Azure IoT Hub or a Ferrohub hub alike.

    python thermostat.py --connection-string "HostName=localhost;DeviceId=...;SharedAccessKey=..." \\
        --ca-file ferrohub-data/certs/ca.pem

It implements the model dtmi:com:example:Thermostat;1 (Thermostat.json next to this file, the
standard DTDL v2 thermostat of the IoT Plug and Play samples):

    telemetry  temperature             double, degrees Celsius
    property   targetTemperature       double, writable
    property   maxTempSinceLastReboot  double, read-only
    command    getMaxMinReport(since: dateTime)
                 -> {maxTemp, minTemp, avgTemp: double, startTime, endTime: dateTime}

and the IoT Plug and Play conventions:
- the model id is announced when connecting (product_info=MODEL_ID puts `model-id=` in the MQTT
  username), so the hub sets the twin's modelId and stamps `dt-dataschema` on telemetry;
- telemetry is {"temperature": t} as application/json, utf-8, every --interval seconds;
- maxTempSinceLastReboot is reported whenever a new maximum is seen;
- a desired targetTemperature is acknowledged in reported properties as
  {"targetTemperature": {"value": v, "ac": 200, "av": <desired $version>, "ad": "Successfully updated"}},
  both at start-up (from the twin's desired section) and for every desired-properties patch;
- getMaxMinReport answers with statistics over the readings taken since `since`.

Stops cleanly on Ctrl-C or SIGTERM, or by itself after --count messages (and --linger seconds).
"""

import argparse
import collections
import json
import os
import signal
import random
import sys
import threading
from datetime import datetime, timezone

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

MODEL_ID = "dtmi:com:example:Thermostat;1"
COMMAND = "getMaxMinReport"
# Readings kept for getMaxMinReport (about 6 days at the default interval).
MAX_READINGS = 100_000


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_datetime(text: str) -> datetime:
    """An ISO 8601 date-time; without an offset it is taken as UTC."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def log(text: str) -> None:
    print(f"{iso(utc_now())}  {text}", flush=True)


class Thermostat:
    """The simulated device: its sensor, its state, and the handlers the SDK calls."""

    def __init__(self, client: IoTHubDeviceClient):
        self.client = client
        self.lock = threading.Lock()
        self.boot_time = utc_now()
        self.readings = collections.deque(maxlen=MAX_READINGS)  # (time, temperature)
        self.temperature = round(random.uniform(18.0, 24.0), 2)
        self.target = None
        self.max_since_reboot = None

    # --- sensor ---------------------------------------------------------------------------

    def read_sensor(self):
        """Takes a reading: returns (temperature, whether it is a new maximum)."""
        with self.lock:
            if self.target is not None:
                self.temperature += (self.target - self.temperature) * 0.3
            self.temperature += random.uniform(-0.5, 0.5)
            t = round(self.temperature, 2)
            self.readings.append((utc_now(), t))
            new_max = self.max_since_reboot is None or t > self.max_since_reboot
            if new_max:
                self.max_since_reboot = t
            return t, new_max

    # --- writable property targetTemperature ------------------------------------------------

    def _ack_target(self, value, version) -> None:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        if valid:
            with self.lock:
                self.target = float(value)
            ack = {"value": value, "ac": 200, "av": version, "ad": "Successfully updated"}
        else:
            ack = {"value": value, "ac": 400, "av": version,
                   "ad": "targetTemperature must be a number"}
        self.client.patch_twin_reported_properties({"targetTemperature": ack})
        log(f"targetTemperature {value!r} (desired $version {version}): acknowledged "
            f"with {ack['ac']}")

    def on_start(self, twin: dict) -> None:
        """At start-up, apply the desired targetTemperature set while the device was off and
        acknowledge it unless the reported section already holds the ack for that version."""
        desired = twin.get("desired", {})
        reported = twin.get("reported", {})
        value = desired.get("targetTemperature")
        if value is None:
            return
        version = desired.get("$version")
        previous = reported.get("targetTemperature")
        if isinstance(previous, dict) and previous.get("av") == version \
                and previous.get("value") == value:
            with self.lock:
                self.target = float(value) if isinstance(value, (int, float)) else None
            log(f"targetTemperature {value!r} (desired $version {version}) already acknowledged")
            return
        self._ack_target(value, version)

    def on_desired_patch(self, patch: dict) -> None:
        """SDK handler: a desired-properties patch (the whole desired section after a reconnect)."""
        try:
            if patch.get("targetTemperature") is not None:
                self._ack_target(patch["targetTemperature"], patch.get("$version"))
        except Exception as e:  # noqa: BLE001 - e.g. the client shutting down meanwhile
            log(f"could not acknowledge {patch}: {e!r}")

    # --- command getMaxMinReport ------------------------------------------------------------

    def max_min_report(self, since):
        """(status, payload) for getMaxMinReport(since)."""
        if since in (None, ""):
            start = self.boot_time
        elif isinstance(since, str):
            try:
                start = max(parse_datetime(since), self.boot_time)
            except ValueError:
                return 400, {"error": f"since must be an ISO 8601 date-time, got {since!r}"}
        else:
            return 400, {"error": f"since must be an ISO 8601 date-time, got {since!r}"}
        end = utc_now()
        with self.lock:
            temps = [t for (at, t) in self.readings if at >= start]
        if not temps:
            return 404, {"error": f"no readings since {iso(start)}"}
        return 200, {
            "maxTemp": max(temps),
            "minTemp": min(temps),
            "avgTemp": round(sum(temps) / len(temps), 2),
            "startTime": iso(start),
            "endTime": iso(end),
        }

    def on_command(self, request) -> None:
        """SDK handler: a direct method (command) request."""
        if request.name == COMMAND:
            status, payload = self.max_min_report(request.payload)
        else:
            status, payload = 404, {"error": f"unknown command {request.name!r}"}
        try:
            self.client.send_method_response(
                MethodResponse.create_from_method_request(request, status, payload))
        except Exception as e:  # noqa: BLE001 - e.g. the client shutting down meanwhile
            log(f"command {request.name}: could not answer: {e!r}")
            return
        log(f"command {request.name}({json.dumps(request.payload)}): answered {status}")


def parse_args(argv):
    p = argparse.ArgumentParser(description="IoT Plug and Play thermostat (" + MODEL_ID + ")")
    p.add_argument("--connection-string", default=os.environ.get("IOTHUB_DEVICE_CONNECTION_STRING"),
                   help="device connection string (default: $IOTHUB_DEVICE_CONNECTION_STRING)")
    p.add_argument("--ca-file", help="PEM file of the CA to trust for the hub's certificate "
                   "(for Ferrohub: ferrohub-data/certs/ca.pem); default: the system's CAs")
    p.add_argument("--interval", type=float, default=5.0,
                   help="seconds between telemetry messages (default 5)")
    p.add_argument("--count", type=int, default=0,
                   help="stop after this many telemetry messages (default 0: run until stopped)")
    p.add_argument("--linger", type=float, default=0.0,
                   help="with --count: keep answering commands and property updates this many "
                   "seconds after the last message (-1: until stopped)")
    args = p.parse_args(argv)
    if not args.connection_string:
        p.error("give --connection-string or set IOTHUB_DEVICE_CONNECTION_STRING")
    if args.interval <= 0 or args.count < 0:
        p.error("--interval must be positive and --count not negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    kwargs = {"product_info": MODEL_ID}
    if args.ca_file:
        with open(args.ca_file, encoding="utf-8") as f:
            kwargs["server_verification_cert"] = f.read()  # the SDK wants the PEM text
    client = IoTHubDeviceClient.create_from_connection_string(args.connection_string, **kwargs)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log(f"got {signal.Signals(signum).name}, stopping")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        try:
            client.connect()
        except Exception as e:  # noqa: BLE001 - reported, and the exit code says it failed
            log(f"cannot connect: {e!r}")
            return 1
        log(f"connected as model {MODEL_ID}")
        thermostat = Thermostat(client)
        client.on_method_request_received = thermostat.on_command
        client.on_twin_desired_properties_patch_received = thermostat.on_desired_patch
        thermostat.on_start(client.get_twin())

        sent = 0
        while not stop.is_set():
            t, new_max = thermostat.read_sensor()
            msg = Message(json.dumps({"temperature": t}), content_encoding="utf-8",
                          content_type="application/json")
            client.send_message(msg)
            sent += 1
            log(f"telemetry #{sent}: temperature {t}")
            if new_max:
                client.patch_twin_reported_properties({"maxTempSinceLastReboot": t})
                log(f"reported maxTempSinceLastReboot {t}")
            if args.count and sent >= args.count:
                break
            stop.wait(args.interval)

        if not stop.is_set() and args.linger:
            log(f"sent {sent} messages; serving commands and properties "
                + ("until stopped" if args.linger < 0 else f"for {args.linger:g} s"))
            stop.wait(None if args.linger < 0 else args.linger)
        return 0
    finally:
        client.shutdown()
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
