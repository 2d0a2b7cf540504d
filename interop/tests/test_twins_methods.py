"""Device twins and direct methods, end to end between the official Python SDKs:
azure-iot-device 2.14.0 on the device side (MQTT) and azure-iot-hub 2.7.0 on the service side
(REST: GET/PATCH/PUT /twins/{id}, POST /twins/{id}/methods, and the module variants)."""

import json
import os
import queue
import subprocess
import threading

import pytest
from azure.iot.device import MethodResponse
from azure.iot.device.exceptions import ClientError
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import _server_bin
from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    RECEIVE_TIMEOUT,
    SEND_TIMEOUT,
    call_with_timeout,
    module_connection_string,
    new_id,
    new_key,
    parse_connection_string,
    service_request,
)

# Longest a test waits for invoke_device_method to return (the hub waits at most the request's
# responseTimeoutInSeconds, plus the REST round trip).
INVOKE_TIMEOUT = 40


def _status(excinfo) -> int:
    return excinfo.value.response.status_code


def _device_id(cs: str) -> str:
    return parse_connection_string(cs)["DeviceId"]


def _connect(client, what="connect()"):
    call_with_timeout(client.connect, CONNECT_TIMEOUT, what)
    assert client.connected


def _set_handler(client, name: str, handler) -> None:
    """Setting a receive handler subscribes (and waits for the SUBACK)."""
    call_with_timeout(lambda: setattr(client, name, handler), CONNECT_TIMEOUT, f"setting {name}")


def _get(q: queue.Queue, what: str):
    try:
        return q.get(timeout=RECEIVE_TIMEOUT)
    except queue.Empty:
        raise AssertionError(f"{what}: nothing within {RECEIVE_TIMEOUT} s") from None


def _user_props(section: dict) -> dict:
    """A twin section without its $version / $metadata."""
    return {k: v for k, v in section.items() if not k.startswith("$")}


def _desired_patch(desired: dict, tags: dict = None) -> Twin:
    return Twin(tags=tags, properties=TwinProperties(desired=desired))


def _invoke(rm, device_id, name, payload, timeout=10, module_id=None):
    req = CloudToDeviceMethod(method_name=name, payload=payload,
                              response_timeout_in_seconds=timeout)
    if module_id is None:
        call = lambda: rm.invoke_device_method(device_id, req)  # noqa: E731
    else:
        call = lambda: rm.invoke_device_module_method(device_id, module_id, req)  # noqa: E731
    return call_with_timeout(call, INVOKE_TIMEOUT, f"invoke {name} on {device_id}/{module_id}")


def _answering_handler(client, calls: list):
    """A method handler that records each request and answers 200 with an echo of it, or 404
    for a method called 'unknown'."""
    def handler(request):
        calls.append(request)
        status = 404 if request.name == "unknown" else 200
        body = {"method": request.name, "echo": request.payload}
        client.send_method_response(MethodResponse.create_from_method_request(request, status, body))
    return handler


# --- twins -------------------------------------------------------------------------------------

def test_device_get_twin_and_reported_patch_seen_by_service(create_device, device_clients,
                                                            registry_manager):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)

    twin = call_with_timeout(client.get_twin, SEND_TIMEOUT, "get_twin()")
    assert isinstance(twin["desired"]["$version"], int), twin
    assert isinstance(twin["reported"]["$version"], int), twin
    reported_version = twin["reported"]["$version"]

    patch = {"firmware": "1.2.3", "battery": 88, "location": {"building": "B7", "floor": 2},
             "note": "ünïcode ok"}
    call_with_timeout(lambda: client.patch_twin_reported_properties(patch), SEND_TIMEOUT,
                      "patch_twin_reported_properties()")

    svc = registry_manager.get_twin(device_id)
    assert svc.device_id == device_id
    assert svc.etag
    assert _user_props(svc.properties.reported) == patch
    assert svc.properties.reported["$version"] == reported_version + 1
    assert "$metadata" in svc.properties.reported

    # A null member is removed; nested objects merge.
    call_with_timeout(
        lambda: client.patch_twin_reported_properties({"battery": None, "location": {"floor": 3}}),
        SEND_TIMEOUT, "second reported patch")
    again = call_with_timeout(client.get_twin, SEND_TIMEOUT, "get_twin() after the patches")
    assert _user_props(again["reported"]) == {"firmware": "1.2.3", "note": "ünïcode ok",
                                              "location": {"building": "B7", "floor": 3}}
    assert again["reported"]["$version"] == reported_version + 2
    assert _user_props(registry_manager.get_twin(device_id).properties.reported) == \
        _user_props(again["reported"])


def test_service_update_twin_with_etag_notifies_the_device_and_stale_etag_is_412(
        create_device, device_clients, registry_manager):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    patches = queue.Queue()
    _set_handler(client, "on_twin_desired_properties_patch_received", patches.put)

    before = registry_manager.get_twin(device_id)
    desired = {"targetTemperature": 22.5, "mode": "eco", "schedule": {"night": 18}}
    updated = registry_manager.update_twin(
        device_id, _desired_patch(desired, tags={"site": "lab-1"}), before.etag)
    assert updated.etag and updated.etag != before.etag
    assert updated.tags == {"site": "lab-1"}
    new_version = updated.properties.desired["$version"]
    assert new_version == before.properties.desired["$version"] + 1

    patch = _get(patches, "desired patch after update_twin")
    assert patch == dict(desired, **{"$version": new_version}), patch

    # The etag read before the update is stale now.
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.update_twin(device_id, _desired_patch({"mode": "boost"}), before.etag)
    assert _status(ei) == 412
    assert "PreconditionFailed" in ei.value.response.text
    # Nothing changed and nothing was sent to the device.
    with pytest.raises(queue.Empty):
        patches.get(timeout=1.0)
    assert registry_manager.get_twin(device_id).properties.desired["mode"] == "eco"

    # Without an etag ("*") the update applies; null removes a member.
    registry_manager.update_twin(device_id, _desired_patch({"mode": None, "fan": "auto"}))
    patch2 = _get(patches, "second desired patch")
    assert patch2 == {"mode": None, "fan": "auto", "$version": new_version + 1}, patch2

    twin = call_with_timeout(client.get_twin, SEND_TIMEOUT, "get_twin()")
    assert _user_props(twin["desired"]) == {"targetTemperature": 22.5, "fan": "auto",
                                            "schedule": {"night": 18}}
    assert twin["desired"]["$version"] == new_version + 1


def test_desired_changes_made_while_offline_reach_the_device_after_reconnect(
        create_device, device_clients, registry_manager):
    """Patches go only to connected devices; on reconnect the SDK GETs the twin (without
    re-subscribing, client-compat.md section 1) and hands a changed desired section to the
    handler as a patch."""
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    patches = queue.Queue()
    _set_handler(client, "on_twin_desired_properties_patch_received", patches.put)
    call_with_timeout(client.disconnect, CONNECT_TIMEOUT, "disconnect()")

    updated = registry_manager.update_twin(device_id, _desired_patch({"interval": 30}))
    version = updated.properties.desired["$version"]
    assert patches.empty()

    _connect(client, "connect() again")
    patch = _get(patches, "desired section after reconnect")
    assert patch["$version"] == version, patch
    assert patch["interval"] == 30, patch


def test_replace_twin_replaces_tags_and_desired(create_device, device_clients, registry_manager):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    patches = queue.Queue()
    _set_handler(client, "on_twin_desired_properties_patch_received", patches.put)

    first = registry_manager.update_twin(device_id, _desired_patch({"a": 1, "b": 2},
                                                                   tags={"t1": "x"}))
    _get(patches, "patch from update_twin")
    replaced = registry_manager.replace_twin(
        device_id, _desired_patch({"only": True}, tags={"t2": "y"}), first.etag)
    assert replaced.tags == {"t2": "y"}
    assert _user_props(replaced.properties.desired) == {"only": True}
    version = replaced.properties.desired["$version"]
    assert version > first.properties.desired["$version"]

    patch = _get(patches, "patch from replace_twin")
    assert patch["$version"] == version, patch
    assert patch.get("only") is True, patch
    twin = call_with_timeout(client.get_twin, SEND_TIMEOUT, "get_twin()")
    assert _user_props(twin["desired"]) == {"only": True}

    with pytest.raises(HttpOperationError) as ei:
        registry_manager.replace_twin(device_id, _desired_patch({}), first.etag)
    assert _status(ei) == 412


def test_invalid_reported_patch_is_refused_and_the_client_stays_usable(create_device,
                                                                      device_clients,
                                                                      registry_manager):
    """A key IoT Hub forbids ('.', '$', space) gets a 400 twin response, which the SDK raises as
    a ClientError; the connection stays up and the twin unchanged."""
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    with pytest.raises(ClientError):
        call_with_timeout(lambda: client.patch_twin_reported_properties({"bad.key": 1}),
                          SEND_TIMEOUT, "reported patch with a '.' in a key")
    assert client.connected
    call_with_timeout(lambda: client.patch_twin_reported_properties({"good": 1}), SEND_TIMEOUT,
                      "valid reported patch afterwards")
    assert _user_props(registry_manager.get_twin(device_id).properties.reported) == {"good": 1}


def test_twin_of_unknown_device_is_404(registry_manager):
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.get_twin(new_id("never-created"))
    assert _status(ei) == 404


def test_model_id_from_product_info_shows_in_the_twin(hub, create_device, device_clients):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs, product_info="dtmi:com:example:Thermostat;1")
    _connect(client)
    # azure-iot-hub 2.7.0's Twin model has no modelId field: read the REST answer itself.
    r = service_request(hub, "GET", f"/twins/{device_id}")
    assert r.status_code == 200, r.text
    assert r.json()["modelId"] == "dtmi:com:example:Thermostat;1", r.json()


# --- direct methods ----------------------------------------------------------------------------

@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt-tls-8883", "websocket-443"])
def test_invoke_device_method_is_answered_by_on_method_request_received(
        create_device, device_clients, registry_manager, websockets):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs, websockets=websockets)
    _connect(client)
    calls = []
    _set_handler(client, "on_method_request_received", _answering_handler(client, calls))

    payload = {"delay": 5, "reason": "update ✓", "list": [1, None, "x"]}
    result = _invoke(registry_manager, device_id, "reboot", payload)
    assert result.status == 200
    assert result.payload == {"method": "reboot", "echo": payload}
    assert calls[-1].name == "reboot" and calls[-1].payload == payload
    assert calls[-1].request_id

    # A plain JSON string, a number, and no payload (the SDK sends "" for None; the device sees None).
    assert _invoke(registry_manager, device_id, "m", "2026-01-01T00:00:00Z").payload["echo"] == \
        "2026-01-01T00:00:00Z"
    assert _invoke(registry_manager, device_id, "m", 42).payload["echo"] == 42
    assert _invoke(registry_manager, device_id, "m", None).payload["echo"] is None

    # The device's status is passed through as is (HTTP 200 for the call itself).
    unknown = _invoke(registry_manager, device_id, "unknown", {})
    assert unknown.status == 404
    assert unknown.payload == {"method": "unknown", "echo": {}}


def test_invoke_method_on_a_disconnected_device_is_404(create_device, device_clients,
                                                       registry_manager):
    never = _device_id(create_device())
    with pytest.raises(HttpOperationError) as ei:
        _invoke(registry_manager, never, "reboot", {})
    assert _status(ei) == 404
    assert "DeviceNotOnline" in ei.value.response.text

    # Connected but not subscribed to $iothub/methods/POST/# counts as not online (IoT Hub).
    idle_cs = create_device()
    idle = device_clients(idle_cs)
    _connect(idle)
    with pytest.raises(HttpOperationError) as ei:
        _invoke(registry_manager, _device_id(idle_cs), "reboot", {})
    assert _status(ei) == 404
    assert "DeviceNotOnline" in ei.value.response.text

    # Connected once with a method handler, then gone.
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    _set_handler(client, "on_method_request_received", _answering_handler(client, []))
    assert _invoke(registry_manager, device_id, "ping", {}).status == 200
    call_with_timeout(client.disconnect, CONNECT_TIMEOUT, "disconnect()")
    with pytest.raises(HttpOperationError) as ei:
        _invoke(registry_manager, device_id, "ping", {})
    assert _status(ei) == 404
    assert "DeviceNotOnline" in ei.value.response.text

    with pytest.raises(HttpOperationError) as ei:
        _invoke(registry_manager, new_id("never-created"), "ping", {})
    assert _status(ei) == 404
    assert "DeviceNotFound" in ei.value.response.text


def test_method_not_answered_in_time_is_504(create_device, device_clients, registry_manager):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    seen = threading.Event()
    _set_handler(client, "on_method_request_received", lambda req: seen.set())  # never answers
    with pytest.raises(HttpOperationError) as ei:
        _invoke(registry_manager, device_id, "slow", {}, timeout=5)
    assert seen.is_set(), "the device never got the request"
    assert _status(ei) == 504
    assert "GatewayTimeout" in ei.value.response.text


# --- modules -----------------------------------------------------------------------------------

def test_module_twin_and_module_method(hub, create_device, device_clients, registry_manager):
    device_cs = create_device()
    device_id = _device_id(device_cs)
    module_id = new_id("mod")
    key = new_key()
    registry_manager.create_module_with_sas(device_id, module_id, None, key, new_key())
    module = device_clients(module_connection_string(hub.hostname, device_id, module_id, key),
                            module=True)
    _connect(module, "module connect()")

    twin = call_with_timeout(module.get_twin, SEND_TIMEOUT, "module get_twin()")
    assert "$version" in twin["desired"] and "$version" in twin["reported"], twin
    call_with_timeout(lambda: module.patch_twin_reported_properties({"moduleState": "running"}),
                      SEND_TIMEOUT, "module reported patch")
    svc = registry_manager.get_module_twin(device_id, module_id)
    assert (svc.device_id, svc.module_id) == (device_id, module_id)
    assert _user_props(svc.properties.reported) == {"moduleState": "running"}
    # The module's twin is its own: the device twin did not change.
    assert _user_props(registry_manager.get_twin(device_id).properties.reported) == {}

    patches = queue.Queue()
    _set_handler(module, "on_twin_desired_properties_patch_received", patches.put)
    updated = registry_manager.update_module_twin(
        device_id, module_id, _desired_patch({"logLevel": "debug"}), svc.etag)
    patch = _get(patches, "module desired patch")
    assert patch == {"logLevel": "debug", "$version": updated.properties.desired["$version"]}
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.update_module_twin(device_id, module_id,
                                            _desired_patch({"logLevel": "info"}), svc.etag)
    assert _status(ei) == 412

    calls = []
    _set_handler(module, "on_method_request_received", _answering_handler(module, calls))
    result = _invoke(registry_manager, device_id, "restartModule", {"force": True},
                     module_id=module_id)
    assert result.status == 200
    assert result.payload == {"method": "restartModule", "echo": {"force": True}}
    assert calls[-1].name == "restartModule"

    # The device itself is not connected: a device-level method is not routed to the module.
    with pytest.raises(HttpOperationError) as ei:
        _invoke(registry_manager, device_id, "restartModule", {})
    assert _status(ei) == 404


# --- the CLI -----------------------------------------------------------------------------------

def test_cli_twin_update_show_and_invoke(hub, create_device, device_clients):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    _connect(client)
    patches = queue.Queue()
    _set_handler(client, "on_twin_desired_properties_patch_received", patches.put)
    _set_handler(client, "on_method_request_received", _answering_handler(client, []))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}

    def cli(*args):
        out = subprocess.run([str(_server_bin()), *args, "--data-dir", str(hub.data_dir)],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, f"ferrohub {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
        return out.stdout

    updated = json.loads(cli("twin", "update", device_id, "--desired", '{"targetTemperature": 25}',
                             "--tags", '{"room": "kitchen"}'))
    assert updated["tags"] == {"room": "kitchen"}
    version = updated["properties"]["desired"]["$version"]
    assert _get(patches, "desired patch from the CLI") == {"targetTemperature": 25,
                                                           "$version": version}

    shown = json.loads(cli("twin", "show", device_id))
    assert shown["deviceId"] == device_id
    assert shown["properties"]["desired"]["targetTemperature"] == 25

    # A stale etag is refused.
    stale = subprocess.run([str(_server_bin()), "twin", "update", device_id, "--desired", "{}",
                            "--etag", "AAAAAAAAAAA=", "--data-dir", str(hub.data_dir)],
                           capture_output=True, text=True, timeout=60, env=env)
    assert stale.returncode != 0
    assert "412" in stale.stderr or "PreconditionFailed" in stale.stderr, stale.stderr

    out = cli("invoke", device_id, "getMaxMinReport", "--payload", '"2026-01-01T00:00:00Z"',
              "--timeout", "10")
    assert "status: 200" in out, out
    assert '"echo": "2026-01-01T00:00:00Z"' in out, out
