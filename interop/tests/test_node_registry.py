"""The official Node service SDK's registry (azure-iothub 1.16.6 `Registry`, REST over HTTPS)
against the same server: `Registry.list`, which sends `GET /devices/?api-version=...` with a
trailing slash, and `Registry.addDevices` (bulk create) with one device that already exists.
The script is interop/node/registry.js; trust comes from NODE_EXTRA_CA_CERTS."""

from test_node_clients import _finish, _line, _node

from ferrohub_helpers import new_id


def _run(hub, *args, **env):
    proc = _node(hub, "registry.js", *args, OWNER_CS=hub.owner_connection_string, **env)
    try:
        got = _line(proc, f"registry.js {' '.join(args)}")
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    return got


def test_node_registry_list_sees_created_devices(hub, create_device):
    cs = create_device()
    device_id = dict(p.split("=", 1) for p in cs.split(";"))["DeviceId"]
    got = _run(hub, "list")
    assert got["status"] == 200
    assert device_id in got["ids"]
    sample = got["sample"]
    # IoT Hub's forms, as the SDK's Device model receives them.
    assert sample["capabilities"] == {"iotEdge": False}
    assert sample["authentication"]["x509Thumbprint"] == {"primaryThumbprint": None,
                                                          "secondaryThumbprint": None}
    assert sample["connectionStateUpdatedTime"].endswith("Z")


def test_node_registry_add_devices_reports_the_one_that_exists(hub, registry_manager, create_device):
    existing = dict(p.split("=", 1) for p in create_device().split(";"))["DeviceId"]
    fresh = [new_id("node-bulk"), new_id("node-bulk")]
    try:
        got = _run(hub, "add-devices", DEVICE_IDS=",".join(fresh + [existing]))
        assert got["status"] == 200, got
        result = got["result"]
        assert result["isSuccessful"] is False
        assert [(e["deviceId"], e["errorCode"]) for e in result["errors"]] == [
            (existing, "DeviceAlreadyExists")]
        for device_id in fresh:
            device = registry_manager.get_device(device_id)
            assert device.authentication.symmetric_key.primary_key, "keys are generated"
    finally:
        for device_id in fresh:
            try:
                registry_manager.delete_device(device_id)
            except Exception:  # noqa: BLE001 - not created, or the server is gone
                pass
