"""examples/thermostat (an IoT Plug and Play thermostat on the official Python device SDK), run as
a subprocess against the hub and driven from the service side: telemetry with dt-dataschema, the
twin's modelId, the targetTemperature acknowledgement and the getMaxMinReport command."""

import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

from conftest import REPO_ROOT
from ferrohub_helpers import (
    API_VERSION,
    RECEIVE_TIMEOUT,
    call_with_timeout,
    device_connection_string,
    new_key,
    parse_connection_string,
    service_request,
    service_token,
    wait_until,
)

EXAMPLE_DIR = REPO_ROOT / "examples" / "thermostat"
MODEL_ID = "dtmi:com:example:Thermostat;1"
STOP_TIMEOUT = 20


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Example:
    """The example as a subprocess; output goes to a file so a full pipe can never block it."""

    def __init__(self, args, log_path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLE_DIR / "thermostat.py"), *args],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM) -> int:
        """Ask it to stop with `sig`; returns its exit code (killing it if it does not exit)."""
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"the example did not stop within {STOP_TIMEOUT} s of {sig.name}:\n"
                            f"{self.output()}", pytrace=False)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def run_example(tmp_path):
    """run_example(*args) -> Example; whatever is still running at the end is killed and its
    output printed (shown by pytest when the test fails)."""
    started = []

    def run(*args):
        ex = Example(list(args), tmp_path / f"thermostat-{len(started)}.log")
        started.append(ex)
        return ex

    yield run
    for ex in started:
        ex.kill()
        print(f"--- thermostat output ({ex.log_path}) ---\n{ex.output()}")


def _read_events(hub, device_id: str, want: int):
    """`want` events of the device from the start of the stream (GET /events, NDJSON)."""
    url = f"https://{hub.hostname}:{hub.https_port}/events"
    params = {"api-version": API_VERSION, "consumerGroup": "interop-thermostat", "from": "start",
              "deviceId": device_id}
    events = []
    with requests.get(url, params=params, headers={"Authorization": service_token(hub)},
                      verify=hub.ca_file, stream=True, timeout=(10, RECEIVE_TIMEOUT)) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if line:
                events.append(json.loads(line))
            if len(events) >= want:
                break
    return events


def _reported(rm, device_id: str) -> dict:
    return rm.get_twin(device_id).properties.reported


def test_model_file_declares_what_the_example_implements():
    model = json.loads((EXAMPLE_DIR / "Thermostat.json").read_text())
    assert model["@id"] == MODEL_ID
    assert model["@context"] == "dtmi:dtdl:context;2"
    names = {c["name"]: c for c in model["contents"]}
    assert set(names) == {"temperature", "targetTemperature", "maxTempSinceLastReboot",
                          "getMaxMinReport"}
    assert names["targetTemperature"]["writable"] is True
    fields = [f["name"] for f in names["getMaxMinReport"]["response"]["schema"]["fields"]]
    assert fields == ["maxTemp", "minTemp", "avgTemp", "startTime", "endTime"]
    source = (EXAMPLE_DIR / "thermostat.py").read_text()
    assert f'MODEL_ID = "{MODEL_ID}"' in source
    assert "azure-iot-device==2.14.0" in (EXAMPLE_DIR / "requirements.txt").read_text()


def test_thermostat_example_against_the_hub(hub, create_device, registry_manager, run_example):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    # The model in the hub's repository, so live conformance checks the device against it.
    model = json.loads((EXAMPLE_DIR / "Thermostat.json").read_text())
    added = service_request(hub, "POST", "/models", json_body=model)
    assert added.status_code == 200, added.text
    assert added.json()["missing"] == [], added.json()

    # Set while the device is off: the example must acknowledge it at start-up.
    before = registry_manager.update_twin(
        device_id, Twin(properties=TwinProperties(desired={"targetTemperature": 19.5})))
    startup_version = before.properties.desired["$version"]

    started_at = datetime.now(timezone.utc)
    ex = run_example("--connection-string", cs, "--ca-file", hub.ca_file,
                     "--interval", "0.5", "--count", "3", "--linger", "120")

    # Three telemetry messages, stamped with the model id.
    events = call_with_timeout(lambda: _read_events(hub, device_id, 3), 60, "reading 3 events")
    assert len(events) == 3, events
    for ev in events:
        sysp = ev["systemProperties"]
        assert sysp["dt-dataschema"] == MODEL_ID, sysp
        assert sysp["content-type"] == "application/json", sysp
        assert sysp["content-encoding"] == "utf-8", sysp
        body = json.loads(ev["body"])
        assert set(body) == {"temperature"} and isinstance(body["temperature"], (int, float)), body

    # The twin shows the model id (azure-iot-hub's Twin model has no field for it: use REST).
    twin = service_request(hub, "GET", f"/twins/{device_id}")
    assert twin.status_code == 200, twin.text
    assert twin.json()["modelId"] == MODEL_ID, twin.json()

    # Start-up acknowledgement of the desired value set before it ran, and the read-only property.
    reported = wait_until(
        lambda: (r := _reported(registry_manager, device_id)).get("targetTemperature", {})
        .get("av") == startup_version and r,
        RECEIVE_TIMEOUT, "start-up ack of targetTemperature")
    assert reported["targetTemperature"] == {"value": 19.5, "ac": 200, "av": startup_version,
                                             "ad": "Successfully updated"}
    temps = [json.loads(ev["body"])["temperature"] for ev in events]
    wait_until(lambda: _reported(registry_manager, device_id).get("maxTempSinceLastReboot")
               == max(temps), RECEIVE_TIMEOUT,
               f"maxTempSinceLastReboot = {max(temps)} (the highest of {temps}) reported")

    # A desired patch while it runs: acknowledged with av = the new desired $version.
    updated = registry_manager.update_twin(
        device_id, Twin(properties=TwinProperties(desired={"targetTemperature": 25.5})))
    version = updated.properties.desired["$version"]
    assert version > startup_version
    reported = wait_until(
        lambda: (r := _reported(registry_manager, device_id)).get("targetTemperature", {})
        .get("av") == version and r,
        RECEIVE_TIMEOUT, "ack of the targetTemperature patch")
    assert reported["targetTemperature"] == {"value": 25.5, "ac": 200, "av": version,
                                             "ad": "Successfully updated"}

    # The command, with a `since` before the example started and with none.
    since = (started_at - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    for payload in (since, None):
        result = call_with_timeout(
            lambda: registry_manager.invoke_device_method(device_id, CloudToDeviceMethod(
                method_name="getMaxMinReport", payload=payload, response_timeout_in_seconds=10)),
            40, "invoke getMaxMinReport")
        assert result.status == 200, result.payload
        report = result.payload
        assert set(report) == {"maxTemp", "minTemp", "avgTemp", "startTime", "endTime"}, report
        assert report["minTemp"] <= report["avgTemp"] <= report["maxTemp"], report
        assert report["maxTemp"] == max(temps) and report["minTemp"] == min(temps), report
        start, end = _parse_time(report["startTime"]), _parse_time(report["endTime"])
        assert started_at - timedelta(minutes=1) <= start <= end <= datetime.now(timezone.utc)

    # A bad argument and an unknown command are answered, not dropped.
    bad = registry_manager.invoke_device_method(device_id, CloudToDeviceMethod(
        method_name="getMaxMinReport", payload="not a date", response_timeout_in_seconds=10))
    assert bad.status == 400, bad.payload
    unknown = registry_manager.invoke_device_method(device_id, CloudToDeviceMethod(
        method_name="reboot", payload={}, response_timeout_in_seconds=10))
    assert unknown.status == 404, unknown.payload
    # The device logs an answer once its PUBACK is in; don't stop it before that.
    wait_until(lambda: "command reboot({}): answered 404" in ex.output(), RECEIVE_TIMEOUT,
               "the example logging its answer to reboot")

    # Live conformance: everything the SDK device sent follows the model and the conventions;
    # the one finding is the service's `reboot`, which the thermostat model does not have.
    def conformance():
        r = service_request(hub, "GET", f"/digitaltwins/{device_id}/conformance")
        assert r.status_code == 200, r.text
        report = r.json()
        return report if report["findings"].get("unknownCommand") else None

    report = wait_until(conformance, RECEIVE_TIMEOUT, "the unknown command checked")
    assert report["modelId"] == MODEL_ID, report
    assert report["findings"] == {"unknownCommand": 1}, report
    # 3 telemetry, the start-up ack, at least one maxTempSinceLastReboot, the patch's ack,
    # 4 commands.
    assert report["checked"] >= 10, report
    # The example keeps what the device answered with the command it was asked.
    assert report["examples"][0]["excerpt"] == (
        "reboot -> 404 {\"error\":\"unknown command 'reboot'\"}"), report

    # Telemetry stopped after --count, but it is still serving (--linger); SIGTERM stops it.
    assert ex.alive(), ex.output()
    assert ex.stop(signal.SIGTERM) == 0, ex.output()
    out = ex.output()
    assert out.count("telemetry #") == 3, out
    assert "stopped" in out.splitlines()[-1], out
    assert "Traceback" not in out and "Exception caught" not in out, out


def test_thermostat_example_stops_by_itself_after_count(hub, create_device, run_example):
    cs = create_device()
    ex = run_example("--connection-string", cs, "--ca-file", hub.ca_file,
                     "--interval", "0.2", "--count", "2")
    try:
        rc = ex.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example did not exit after --count 2:\n{ex.output()}", pytrace=False)
    out = ex.output()
    assert rc == 0, out
    assert out.count("telemetry #") == 2, out
    assert "Traceback" not in out, out


def test_thermostat_example_refuses_a_wrong_key(hub, create_device, run_example):
    cs = parse_connection_string(create_device())
    wrong = device_connection_string(cs["HostName"], cs["DeviceId"], new_key())
    ex = run_example("--connection-string", wrong, "--ca-file", hub.ca_file, "--count", "1")
    started = time.monotonic()
    try:
        rc = ex.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the example kept running with a wrong key:\n{ex.output()}", pytrace=False)
    assert rc == 1, ex.output()
    assert "cannot connect" in ex.output(), ex.output()
    assert time.monotonic() - started < 90
