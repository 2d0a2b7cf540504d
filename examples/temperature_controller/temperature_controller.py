#!/usr/bin/env python3
"""An IoT Plug and Play temperature controller with two thermostat components, on the official
Azure IoT device SDK for Python (azure-iot-device), unmodified: it runs against Azure IoT Hub or
a Ferrohub hub alike.

    python temperature_controller.py --connection-string "HostName=localhost;DeviceId=...;SharedAccessKey=..." \\
        --ca-file ferrohub-data/certs/ca.pem

It implements dtmi:com:example:TemperatureController;2 (TemperatureController.json, with
Thermostat.json and DeviceInformation.json next to this file), the shape of the public IoT Plug
and Play samples:

    root               telemetry workingSet (double, KiB), property serialNumber (string),
                       command reboot(delay: integer)
    thermostat1, thermostat2   dtmi:com:example:Thermostat;1: telemetry temperature, writable
                       targetTemperature, read-only maxTempSinceLastReboot, command
                       getMaxMinReport(since) -> {maxTemp, minTemp, avgTemp, startTime, endTime}
    deviceInformation  dtmi:azure:DeviceManagement:DeviceInformation;1, reported once at start

and the conventions for components:
- a component's telemetry carries its name as `$.sub` (the SDK sends custom property `$.sub`);
- a component's reported properties are wrapped in {"<component>": {"__t": "c", ...}};
- a desired patch {"thermostat1": {"__t": "c", "targetTemperature": 25}} is acknowledged as
  {"thermostat1": {"__t": "c", "targetTemperature": {"value": 25, "ac": 200, "av": <$version>,
  "ad": "Successfully updated"}}};
- commands arrive as `reboot` and `thermostat1*getMaxMinReport`.

Stops cleanly on Ctrl-C or SIGTERM, or by itself after --count rounds (and --linger seconds).
"""

import argparse
import json
import os
import platform
import random
import signal
import sys
import threading
from datetime import datetime, timezone

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

MODEL_ID = "dtmi:com:example:TemperatureController;2"
THERMOSTATS = ("thermostat1", "thermostat2")
# Readings kept per thermostat for getMaxMinReport.
MAX_READINGS = 10_000


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log(text: str) -> None:
    print(f"{iso(utc_now())}  {text}", flush=True)


def telemetry(values: dict, component: str = None) -> Message:
    """A telemetry message as the IoT Plug and Play convention shapes it."""
    msg = Message(json.dumps(values), content_encoding="utf-8", content_type="application/json")
    if component:
        msg.custom_properties["$.sub"] = component
    return msg


class Thermostat:
    """One thermostat component: its simulated sensor and what it remembers."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self.boot = utc_now()
        self.temperature = round(random.uniform(18.0, 24.0), 2)
        self.target = None
        self.max_since_reboot = None
        self.readings = []

    def read(self):
        with self.lock:
            if self.target is not None:
                self.temperature += (self.target - self.temperature) * 0.3
            self.temperature += random.uniform(-0.5, 0.5)
            t = round(self.temperature, 2)
            self.readings = (self.readings + [(utc_now(), t)])[-MAX_READINGS:]
            new_max = self.max_since_reboot is None or t > self.max_since_reboot
            if new_max:
                self.max_since_reboot = t
            return t, new_max

    def report(self, since):
        start = self.boot
        if isinstance(since, str) and since:
            try:
                parsed = datetime.fromisoformat(since.replace("Z", "+00:00"))
            except ValueError:
                return 400, {"error": f"since must be an ISO 8601 date-time, got {since!r}"}
            start = max(parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc), self.boot)
        with self.lock:
            temps = [t for (at, t) in self.readings if at >= start]
        if not temps:
            return 404, {"error": f"no readings since {iso(start)}"}
        return 200, {"maxTemp": max(temps), "minTemp": min(temps),
                     "avgTemp": round(sum(temps) / len(temps), 2),
                     "startTime": iso(start), "endTime": iso(utc_now())}


class Controller:
    def __init__(self, client: IoTHubDeviceClient):
        self.client = client
        self.thermostats = {name: Thermostat(name) for name in THERMOSTATS}

    def ack(self, component: str, value, version) -> None:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        if valid:
            with self.thermostats[component].lock:
                self.thermostats[component].target = float(value)
        ack = {"value": value, "ac": 200 if valid else 400, "av": version,
               "ad": "Successfully updated" if valid else "targetTemperature must be a number"}
        self.client.patch_twin_reported_properties(
            {component: {"__t": "c", "targetTemperature": ack}})
        log(f"{component}.targetTemperature {value!r} (desired $version {version}): ack {ack['ac']}")

    def apply_desired(self, desired: dict, reported: dict = None) -> None:
        """Acknowledges each thermostat's targetTemperature in `desired` (a patch, or the whole
        section at start-up, where an ack already reported for that version is not repeated)."""
        version = desired.get("$version")
        for name in THERMOSTATS:
            part = desired.get(name)
            if not isinstance(part, dict) or part.get("targetTemperature") is None:
                continue
            value = part["targetTemperature"]
            previous = ((reported or {}).get(name) or {}).get("targetTemperature")
            if isinstance(previous, dict) and previous.get("av") == version:
                continue
            self.ack(name, value, version)

    def on_desired_patch(self, patch: dict) -> None:
        try:
            self.apply_desired(patch)
        except Exception as e:  # noqa: BLE001 - e.g. the client shutting down meanwhile
            log(f"could not acknowledge {patch}: {e!r}")

    def on_command(self, request) -> None:
        component, _, command = request.name.rpartition("*")
        if not component and command == "reboot":
            delay = request.payload if isinstance(request.payload, int) else 0
            status, payload = 200, {"rebootingIn": delay}
        elif component in self.thermostats and command == "getMaxMinReport":
            status, payload = self.thermostats[component].report(request.payload)
        else:
            status, payload = 404, {"error": f"unknown command {request.name!r}"}
        try:
            self.client.send_method_response(
                MethodResponse.create_from_method_request(request, status, payload))
        except Exception as e:  # noqa: BLE001
            log(f"command {request.name}: could not answer: {e!r}")
            return
        log(f"command {request.name}({json.dumps(request.payload)}): answered {status}")

    def device_information(self) -> dict:
        return {"deviceInformation": {
            "__t": "c",
            "manufacturer": "Ferrohub examples",
            "model": "temperature-controller",
            "swVersion": "1.0.0",
            "osName": platform.system() or "unknown",
            "processorArchitecture": platform.machine() or "unknown",
            "processorManufacturer": "unknown",
            "totalStorage": 1024.0,
            "totalMemory": 256.0,
        }}


def parse_args(argv):
    p = argparse.ArgumentParser(description="IoT Plug and Play temperature controller (" + MODEL_ID + ")")
    p.add_argument("--connection-string", default=os.environ.get("IOTHUB_DEVICE_CONNECTION_STRING"))
    p.add_argument("--ca-file", help="PEM file of the CA to trust (for Ferrohub: ferrohub-data/certs/ca.pem)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between rounds of telemetry")
    p.add_argument("--count", type=int, default=0, help="stop after this many rounds (0: run until stopped)")
    p.add_argument("--linger", type=float, default=0.0,
                   help="with --count: keep serving this many seconds after the last round (-1: until stopped)")
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
            kwargs["server_verification_cert"] = f.read()
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
        except Exception as e:  # noqa: BLE001
            log(f"cannot connect: {e!r}")
            return 1
        log(f"connected as model {MODEL_ID}")
        controller = Controller(client)
        client.on_method_request_received = controller.on_command
        client.on_twin_desired_properties_patch_received = controller.on_desired_patch
        twin = client.get_twin()
        client.patch_twin_reported_properties({"serialNumber": "SN-" + str(random.randint(1000, 9999))})
        client.patch_twin_reported_properties(controller.device_information())
        controller.apply_desired(twin.get("desired", {}), twin.get("reported", {}))

        rounds = 0
        while not stop.is_set():
            client.send_message(telemetry({"workingSet": round(random.uniform(1000, 2000), 1)}))
            for name, thermostat in controller.thermostats.items():
                t, new_max = thermostat.read()
                client.send_message(telemetry({"temperature": t}, name))
                if new_max:
                    client.patch_twin_reported_properties(
                        {name: {"__t": "c", "maxTempSinceLastReboot": t}})
            rounds += 1
            log(f"round #{rounds}: telemetry sent")
            if args.count and rounds >= args.count:
                break
            stop.wait(args.interval)
        if not stop.is_set() and args.linger:
            stop.wait(None if args.linger < 0 else args.linger)
        return 0
    finally:
        client.shutdown()
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
