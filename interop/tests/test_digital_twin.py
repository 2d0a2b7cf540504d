"""The IoT Plug and Play digital twin API with the official SDKs: azure-iot-hub 2.7.0's
DigitalTwinClient (get_digital_twin, update_digital_twin, invoke_command,
invoke_component_command) against an azure-iot-device 2.14.0 device that announces its model
(product_info), reports a component with the `__t` marker and acknowledges writable
properties by the conventions."""

import queue

import pytest
from azure.iot.device import MethodResponse
from msrest.exceptions import HttpOperationError

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    RECEIVE_TIMEOUT,
    SEND_TIMEOUT,
    call_with_timeout,
    parse_connection_string,
)

MODEL_ID = "dtmi:com:example:TemperatureController;2"
INVOKE_TIMEOUT = 40


@pytest.fixture
def digital_twins(hub, monkeypatch):
    """DigitalTwinClient on the owner connection string, trusting only the hub's CA."""
    from azure.iot.hub import DigitalTwinClient

    # requests reads these when a call has no `verify` of its own; set both explicitly so
    # nothing falls back to the system store.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", hub.ca_file)
    monkeypatch.setenv("SSL_CERT_FILE", hub.ca_file)
    dt = DigitalTwinClient.from_connection_string(hub.owner_connection_string)
    dt.protocol.config.connection.verify = hub.ca_file
    dt.protocol.config.connection.timeout = 20
    dt.protocol.config.retry_policy.retries = 0
    return dt


def _get(q: queue.Queue, what: str):
    try:
        return q.get(timeout=RECEIVE_TIMEOUT)
    except queue.Empty:
        raise AssertionError(f"{what}: nothing within {RECEIVE_TIMEOUT} s") from None


def _status(excinfo) -> int:
    return excinfo.value.response.status_code


def test_digital_twin_client_against_a_pnp_device(create_device, device_clients, digital_twins):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    client = device_clients(cs, product_info=MODEL_ID)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")

    calls = queue.Queue()

    def on_method(request):
        calls.put((request.name, request.payload))
        status = 404 if request.name.endswith("unknown") else 200
        body = {"method": request.name, "echo": request.payload}
        client.send_method_response(MethodResponse.create_from_method_request(request, status, body))

    patches = queue.Queue()
    call_with_timeout(lambda: setattr(client, "on_method_request_received", on_method),
                      CONNECT_TIMEOUT, "setting on_method_request_received")
    call_with_timeout(lambda: setattr(client, "on_twin_desired_properties_patch_received",
                                      patches.put),
                      CONNECT_TIMEOUT, "setting on_twin_desired_properties_patch_received")

    call_with_timeout(lambda: client.patch_twin_reported_properties(
        {"serialNumber": "SN-1", "thermostat1": {"__t": "c", "maxTempSinceLastReboot": 38.7}}),
        SEND_TIMEOUT, "reporting properties")

    # get_digital_twin: IoT Hub's shape, the model from the device's CONNECT.
    twin = call_with_timeout(lambda: digital_twins.get_digital_twin(device_id), SEND_TIMEOUT,
                             "get_digital_twin")
    assert twin["$dtId"] == device_id, twin
    assert twin["$metadata"]["$model"] == MODEL_ID, twin
    assert twin["serialNumber"] == "SN-1", twin
    assert twin["$metadata"]["serialNumber"]["lastUpdateTime"], twin
    assert twin["thermostat1"]["maxTempSinceLastReboot"] == 38.7, twin
    assert set(twin["thermostat1"]["$metadata"]) == {"maxTempSinceLastReboot"}, twin
    assert "__t" not in twin["thermostat1"], twin

    # update_digital_twin: the device gets a desired patch with the component marker.
    call_with_timeout(lambda: digital_twins.update_digital_twin(device_id, [
        {"op": "add", "path": "/thermostat1/targetTemperature", "value": 21.5},
        {"op": "add", "path": "/interval", "value": 5},
    ]), SEND_TIMEOUT, "update_digital_twin")
    patch = _get(patches, "desired patch from update_digital_twin")
    version = patch["$version"]
    assert patch == {"thermostat1": {"__t": "c", "targetTemperature": 21.5}, "interval": 5,
                     "$version": version}, patch
    call_with_timeout(lambda: client.patch_twin_reported_properties({
        "thermostat1": {"__t": "c", "targetTemperature":
                        {"value": 21.5, "ac": 200, "av": version, "ad": "Successfully updated"}},
        "interval": {"value": 5, "ac": 200, "av": version},
    }), SEND_TIMEOUT, "acknowledging the writable properties")

    twin = digital_twins.get_digital_twin(device_id)
    assert twin["thermostat1"]["targetTemperature"] == 21.5, twin
    meta = twin["thermostat1"]["$metadata"]["targetTemperature"]
    assert {k: v for k, v in meta.items() if k != "lastUpdateTime"} == {
        "desiredValue": 21.5, "desiredVersion": version, "ackVersion": version, "ackCode": 200,
        "ackDescription": "Successfully updated"}, twin
    assert meta["lastUpdateTime"], twin
    assert twin["interval"] == 5, twin
    assert twin["$metadata"]["interval"]["ackVersion"] == version, twin

    # The etag: the GET's ETag header goes back as If-Match; a stale one is 412.
    raw = digital_twins.protocol.digital_twin.get_digital_twin(device_id, raw=True)
    etag = raw.headers["ETag"]
    assert etag, raw.headers
    digital_twins.update_digital_twin(
        device_id, [{"op": "replace", "path": "/interval", "value": 6}], etag)
    assert _get(patches, "patch under If-Match")["interval"] == 6
    with pytest.raises(HttpOperationError) as ei:
        digital_twins.update_digital_twin(
            device_id, [{"op": "replace", "path": "/interval", "value": 7}], etag)
    assert _status(ei) == 412
    # A patch IoT Hub refuses.
    with pytest.raises(HttpOperationError) as ei:
        digital_twins.update_digital_twin(device_id, [{"op": "move", "from": "/a", "path": "/b"}])
    assert _status(ei) == 400
    assert patches.empty(), "a refused patch reached the device"

    # invoke_command and invoke_component_command: `name` and `component*name` on the device,
    # the device's payload back.
    result = call_with_timeout(lambda: digital_twins.invoke_command(
        device_id, "reboot", {"delay": 1}, connect_timeout_in_seconds=5,
        response_timeout_in_seconds=10), INVOKE_TIMEOUT, "invoke_command")
    assert result == {"method": "reboot", "echo": {"delay": 1}}, result
    assert _get(calls, "root command") == ("reboot", {"delay": 1})

    since = "2026-12-01T00:00:00Z"
    result = call_with_timeout(lambda: digital_twins.invoke_component_command(
        device_id, "thermostat1", "getMaxMinReport", since, response_timeout_in_seconds=10),
        INVOKE_TIMEOUT, "invoke_component_command")
    assert result == {"method": "thermostat1*getMaxMinReport", "echo": since}, result
    assert _get(calls, "component command") == ("thermostat1*getMaxMinReport", since)

    # The device's status comes in x-ms-command-statuscode, with HTTP 200.
    raw = call_with_timeout(lambda: digital_twins.protocol.digital_twin.invoke_component_command(
        device_id, "thermostat1", "unknown", {}, response_timeout_in_seconds=10, raw=True),
        INVOKE_TIMEOUT, "invoke_component_command raw")
    assert raw.headers["x-ms-command-statuscode"] == 404, raw.headers
    assert raw.headers["x-ms-request-id"], raw.headers
    assert raw.output == {"method": "thermostat1*unknown", "echo": {}}, raw.output


def test_commands_to_an_offline_device_are_404(create_device, digital_twins):
    device_id = parse_connection_string(create_device())["DeviceId"]
    with pytest.raises(HttpOperationError) as ei:
        digital_twins.invoke_command(device_id, "reboot", {}, response_timeout_in_seconds=5)
    assert _status(ei) == 404
    assert "DeviceNotOnline" in ei.value.response.text
    with pytest.raises(HttpOperationError) as ei:
        digital_twins.get_digital_twin(device_id + "-never-created")
    assert _status(ei) == 404


@pytest.fixture
def thermostat(tmp_path):
    """thermostat(*args) starts examples/thermostat as a subprocess; killed (and its output
    printed) at the end."""
    from test_thermostat_example import Example

    started = []

    def run(*args):
        ex = Example(list(args), tmp_path / f"thermostat-{len(started)}.log")
        started.append(ex)
        return ex

    yield run
    for ex in started:
        ex.kill()
        print(f"--- thermostat output ({ex.log_path}) ---\n{ex.output()}")


def test_digital_twin_client_against_the_thermostat_example(hub, create_device, digital_twins,
                                                           thermostat):
    from ferrohub_helpers import wait_until

    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    ex = thermostat("--connection-string", cs, "--ca-file", hub.ca_file, "--interval", "0.5",
                    "--count", "3", "--linger", "120")

    # The example reports maxTempSinceLastReboot once it has a reading.
    twin = wait_until(
        lambda: (t := digital_twins.get_digital_twin(device_id)).get("maxTempSinceLastReboot")
        is not None and t, RECEIVE_TIMEOUT * 2, "maxTempSinceLastReboot in the digital twin")
    assert twin["$metadata"]["$model"] == "dtmi:com:example:Thermostat;1", twin
    assert twin["$metadata"]["maxTempSinceLastReboot"]["lastUpdateTime"], twin

    # A writable property through the digital twin, acknowledged by the example.
    digital_twins.update_digital_twin(
        device_id, [{"op": "add", "path": "/targetTemperature", "value": 24.5}])
    twin = wait_until(
        lambda: (t := digital_twins.get_digital_twin(device_id)).get("targetTemperature") == 24.5
        and t["$metadata"]["targetTemperature"].get("ackVersion") is not None and t,
        RECEIVE_TIMEOUT, "the example's ack of targetTemperature")
    meta = twin["$metadata"]["targetTemperature"]
    assert meta["desiredValue"] == 24.5, twin
    assert meta["ackVersion"] == meta["desiredVersion"], twin
    assert meta["ackCode"] == 200 and meta["ackDescription"] == "Successfully updated", twin

    # The example's command.
    report = call_with_timeout(lambda: digital_twins.invoke_command(
        device_id, "getMaxMinReport", "2000-01-01T00:00:00Z", response_timeout_in_seconds=10),
        INVOKE_TIMEOUT, "invoke_command getMaxMinReport")
    assert set(report) == {"maxTemp", "minTemp", "avgTemp", "startTime", "endTime"}, report
    assert report["minTemp"] <= report["avgTemp"] <= report["maxTemp"], report
    assert ex.alive(), ex.output()


def test_node_digital_twin_client_against_a_pnp_device(hub, create_device, device_clients):
    """azure-iothub 1.16.6's DigitalTwinClient (interop/node/digital_twin.js): getDigitalTwin
    with its ETag, updateDigitalTwin under that ETag (202), invokeCommand and
    invokeComponentCommand with the device's status from x-ms-command-statuscode."""
    import json

    from test_node_clients import _finish, _line, _node

    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    client = device_clients(cs, product_info=MODEL_ID)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    calls = queue.Queue()

    def on_method(request):
        calls.put((request.name, request.payload))
        status = 201 if "*" in request.name else 200
        client.send_method_response(MethodResponse.create_from_method_request(
            request, status, {"method": request.name, "echo": request.payload}))

    patches = queue.Queue()
    call_with_timeout(lambda: setattr(client, "on_method_request_received", on_method),
                      CONNECT_TIMEOUT, "setting on_method_request_received")
    call_with_timeout(lambda: setattr(client, "on_twin_desired_properties_patch_received",
                                      patches.put),
                      CONNECT_TIMEOUT, "setting on_twin_desired_properties_patch_received")
    call_with_timeout(lambda: client.patch_twin_reported_properties(
        {"thermostat1": {"__t": "c", "maxTempSinceLastReboot": 30.5}}), SEND_TIMEOUT,
        "reporting properties")

    patch = [{"op": "add", "path": "/thermostat1/targetTemperature", "value": 22}]
    proc = _node(hub, "digital_twin.js", OWNER_CS=hub.owner_connection_string,
                 DEVICE_ID=device_id, PATCH=json.dumps(patch))
    try:
        got = _line(proc, "getDigitalTwin")
        assert got["twin"]["$dtId"] == device_id, got
        assert got["twin"]["$metadata"]["$model"] == MODEL_ID, got
        assert got["twin"]["thermostat1"]["maxTempSinceLastReboot"] == 30.5, got
        assert got["etag"], got

        updated = _line(proc, "updateDigitalTwin")
        assert updated["status"] == 202, updated
        assert updated["etag"] and updated["etag"] != got["etag"], updated
        desired = _get(patches, "desired patch from updateDigitalTwin")
        assert desired["thermostat1"] == {"__t": "c", "targetTemperature": 22}, desired

        root = _line(proc, "invokeCommand")
        assert root["body"] == {"method": "reboot", "echo": {"delay": 1}}, root
        assert root["statusCode"] == 200 and root["requestId"], root
        comp = _line(proc, "invokeComponentCommand")
        assert comp["body"] == {"method": "thermostat1*getMaxMinReport",
                                "echo": "2026-12-01T00:00:00Z"}, comp
        assert comp["statusCode"] == 201 and comp["requestId"], comp
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [_get(calls, "command")[0] for _ in range(2)] == ["reboot",
                                                              "thermostat1*getMaxMinReport"]
