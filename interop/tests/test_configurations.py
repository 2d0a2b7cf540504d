"""Automatic device management from the official service SDKs, unmodified: azure-iot-hub
2.7.0's IoTHubConfigurationManager (create, get, list, update under etags, testQueries,
delete) against /configurations, and the content arriving as a desired-property patch on a
device connected with azure-iot-device 2.14.0 (MQTT); and azure-iothub 1.16.6 (Node) Registry's
configuration methods (interop/node/configurations.js)."""

import queue
import uuid

import pytest
from azure.iot.hub.models import (
    Configuration,
    ConfigurationContent,
    ConfigurationMetrics,
    ConfigurationQueriesTestInput,
    Twin,
)
from msrest.exceptions import HttpOperationError

from ferrohub_helpers import CONNECT_TIMEOUT, RECEIVE_TIMEOUT, SEND_TIMEOUT, call_with_timeout, parse_connection_string


def _status(excinfo) -> int:
    return excinfo.value.response.status_code


def test_python_configuration_lifecycle_reaches_the_device(
        create_device, registry_manager, device_clients, configuration_manager):
    run = f"cfg{uuid.uuid4().hex[:8]}"
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    other = parse_connection_string(create_device())["DeviceId"]
    registry_manager.update_twin(other, Twin(tags={"run": "someone-else"}), "*")

    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    patches = queue.Queue()
    call_with_timeout(lambda: setattr(client, "on_twin_desired_properties_patch_received", patches.put),
                      CONNECT_TIMEOUT, "setting the desired patch handler")

    config = Configuration(
        id=run,
        schema_version="1.0",
        labels={"run": run},
        content=ConfigurationContent(device_content={"properties.desired.fleet": {"interval": 30}}),
        target_condition=f"tags.run = '{run}'",
        priority=10,
        metrics=ConfigurationMetrics(queries={
            "all": f"SELECT deviceId FROM devices WHERE tags.run = '{run}'"}),
    )
    created = configuration_manager.create_configuration(config)
    assert created.id == run and created.etag and created.priority == 10
    assert created.created_time_utc is not None
    assert created.system_metrics.results["targetedCount"] == 0

    # Creating the same id again is refused.
    with pytest.raises(HttpOperationError) as ei:
        configuration_manager.create_configuration(config)
    assert _status(ei) == 409

    # A tag change through the twin API makes the device match: the content arrives.
    registry_manager.update_twin(device_id, Twin(tags={"run": run}), "*")
    patch = patches.get(timeout=RECEIVE_TIMEOUT)
    assert patch["fleet"] == {"interval": 30}, patch
    twin = call_with_timeout(client.get_twin, SEND_TIMEOUT, "get_twin()")
    assert twin["desired"]["fleet"] == {"interval": 30}
    assert "fleet" not in registry_manager.get_twin(other).properties.desired

    got = configuration_manager.get_configuration(run)
    assert got.system_metrics.results["targetedCount"] == 1
    assert got.system_metrics.results["appliedCount"] == 1
    assert got.metrics.results["all"] == 1
    assert got.content.device_content == {"properties.desired.fleet": {"interval": 30}}
    assert any(c.id == run for c in configuration_manager.get_configurations(100))

    # Update under the current etag; a stale one is 412.
    got.priority = 20
    updated = configuration_manager.update_configuration(got, got.etag)
    assert updated.priority == 20 and updated.etag != got.etag
    with pytest.raises(HttpOperationError) as ei:
        configuration_manager.update_configuration(got, got.etag)
    assert _status(ei) == 412

    answer = configuration_manager.test_configuration_queries(ConfigurationQueriesTestInput(
        target_condition="tags.run = ", custom_metric_queries={"ok": "SELECT deviceId FROM devices"}))
    assert answer.target_condition_error
    assert answer.custom_metric_query_errors == {"ok": ""}

    configuration_manager.delete_configuration(run)
    with pytest.raises(HttpOperationError) as ei:
        configuration_manager.get_configuration(run)
    assert _status(ei) == 404
    # What it wrote stays, as in IoT Hub.
    assert registry_manager.get_twin(device_id).properties.desired["fleet"] == {"interval": 30}


def test_node_registry_configuration_methods(hub, create_device, registry_manager):
    """azure-iothub 1.16.6 Registry: addConfiguration (which fills in schemaVersion),
    getConfiguration, getConfigurations, updateConfiguration with forceUpdate, and
    removeConfiguration; the content reaches the targeted twin."""
    from test_node_clients import _finish, _line, _node

    run = f"node{uuid.uuid4().hex[:8]}"
    device_id = parse_connection_string(create_device())["DeviceId"]
    registry_manager.update_twin(device_id, Twin(tags={"run": run}), "*")
    proc = _node(hub, "configurations.js", OWNER_CS=hub.owner_connection_string, CONFIG_ID=run,
                 TARGET=f"tags.run = '{run}'")
    try:
        got = _line(proc, "configurations.js")
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "error" not in got, got
    assert got["got"]["schemaVersion"] == "1.0"
    assert got["got"]["systemMetrics"]["results"] == {"targetedCount": 1, "appliedCount": 1}
    assert run in got["listed"]
    assert got["updated"]["priority"] == 5
    assert got["afterRemove"] == 404
    assert registry_manager.get_twin(device_id).properties.desired["nodeSetting"] == {"level": 3}
