"""examples/temperature_controller (an IoT Plug and Play device with two thermostat components
and a device information component, on the official Python device SDK) run against the hub:
component telemetry with dt-subject, component reported properties with the `__t` marker, the
acknowledgement of a component's writable property, root and component commands, and live
conformance finding nothing wrong with what the real SDK sent."""

import json
import signal
import subprocess
import sys

import pytest
import requests
from azure.iot.hub.models import CloudToDeviceMethod

from conftest import REPO_ROOT
from ferrohub_helpers import (
    API_VERSION,
    RECEIVE_TIMEOUT,
    call_with_timeout,
    parse_connection_string,
    service_request,
    service_token,
    wait_until,
)

EXAMPLE_DIR = REPO_ROOT / "examples" / "temperature_controller"
MODEL_ID = "dtmi:com:example:TemperatureController;2"


@pytest.fixture
def controller_example(tmp_path):
    """controller_example(*args) -> (process, log path); killed at the end, output printed."""
    started = []

    def run(*args):
        log = tmp_path / f"controller-{len(started)}.log"
        out = open(log, "wb")
        proc = subprocess.Popen([sys.executable, str(EXAMPLE_DIR / "temperature_controller.py"), *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT)
        started.append((proc, out, log))
        return proc, log

    yield run
    for proc, out, log in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        print(f"--- temperature controller output ({log}) ---\n{log.read_text(errors='replace')}")


def _events(hub, device_id: str, want: int):
    url = f"https://{hub.hostname}:{hub.https_port}/events"
    params = {"api-version": API_VERSION, "consumerGroup": "interop-controller", "from": "start",
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


def test_temperature_controller_example_conforms(hub, create_device, registry_manager,
                                                 controller_example):
    models = [json.loads((EXAMPLE_DIR / f).read_text())
              for f in ("TemperatureController.json", "Thermostat.json", "DeviceInformation.json")]
    added = service_request(hub, "POST", "/models", json_body=models)
    assert added.status_code == 200, added.text
    assert added.json()["missing"] == [], added.json()

    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    # A component's writable property set while the device is off: acknowledged at start-up.
    set_before = service_request(hub, "PATCH", f"/twins/{device_id}", json_body={
        "properties": {"desired": {"thermostat2": {"__t": "c", "targetTemperature": 21.0}}}})
    assert set_before.status_code == 200, set_before.text
    version = set_before.json()["properties"]["desired"]["$version"]

    proc, log = controller_example("--connection-string", cs, "--ca-file", hub.ca_file,
                                   "--interval", "0.5", "--count", "3", "--linger", "120")

    # 3 rounds: workingSet on the root, temperature from each thermostat with dt-subject.
    events = call_with_timeout(lambda: _events(hub, device_id, 9), 60, "reading 9 events")
    subjects = sorted(e["systemProperties"].get("dt-subject", "") for e in events)
    assert subjects == [""] * 3 + ["thermostat1"] * 3 + ["thermostat2"] * 3, subjects
    for e in events:
        assert e["systemProperties"]["dt-dataschema"] == MODEL_ID, e

    # Reported: the root property, device information and the start-up ack, marked as components.
    def reported():
        r = registry_manager.get_twin(device_id).properties.reported
        ack = (r.get("thermostat2") or {}).get("targetTemperature") or {}
        return r if ack.get("av") == version and "deviceInformation" in r else None

    r = wait_until(reported, RECEIVE_TIMEOUT, "start-up ack and device information")
    assert r["serialNumber"].startswith("SN-"), r
    assert r["deviceInformation"]["__t"] == "c", r
    assert r["thermostat2"]["__t"] == "c", r
    assert r["thermostat2"]["targetTemperature"] == {
        "value": 21.0, "ac": 200, "av": version, "ad": "Successfully updated"}, r

    # Commands on the root and on a component.
    reboot = call_with_timeout(lambda: registry_manager.invoke_device_method(
        device_id, CloudToDeviceMethod(method_name="reboot", payload=5,
                                       response_timeout_in_seconds=10)), 40, "reboot")
    assert (reboot.status, reboot.payload) == (200, {"rebootingIn": 5})
    report = call_with_timeout(lambda: registry_manager.invoke_device_method(
        device_id, CloudToDeviceMethod(method_name="thermostat1*getMaxMinReport", payload=None,
                                       response_timeout_in_seconds=10)), 40, "getMaxMinReport")
    assert report.status == 200, report.payload
    assert set(report.payload) == {"maxTemp", "minTemp", "avgTemp", "startTime", "endTime"}

    # Live conformance: nothing the SDK device sent, nor the commands, departs from the model.
    def checked_enough():
        c = service_request(hub, "GET", f"/digitaltwins/{device_id}/conformance")
        assert c.status_code == 200, c.text
        body = c.json()
        # 9 telemetry, serialNumber, deviceInformation, the ack, 2 commands at least.
        return body if body["checked"] >= 14 else None

    body = wait_until(checked_enough, RECEIVE_TIMEOUT, "conformance checks")
    assert body["modelId"] == MODEL_ID, body
    assert body["findings"] == {}, body

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text(errors="replace")
    out = log.read_text(errors="replace")
    assert "Traceback" not in out and "Exception caught" not in out, out
