"""The official Python service SDK (azure-iot-hub 2.7.0, REST over HTTPS on 443) against
ferrohub's registry API, with the server's CA as the only change."""

import pytest
from azure.iot.device.exceptions import CredentialError
from msrest.exceptions import HttpOperationError

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    call_with_timeout,
    device_connection_string,
    new_id,
    new_key,
)


def _status(excinfo) -> int:
    return excinfo.value.response.status_code


@pytest.fixture
def device_ids(registry_manager):
    """Ids of devices a test creates itself; deleted (best effort) afterwards."""
    ids = []
    yield ids
    for device_id in ids:
        try:
            registry_manager.delete_device(device_id)
        except Exception:  # noqa: BLE001
            pass


def _create(rm, device_ids, status="enabled"):
    device_id = new_id("svc")
    primary, secondary = new_key(), new_key()
    device = rm.create_device_with_sas(device_id, primary, secondary, status)
    device_ids.append(device_id)
    return device, primary, secondary


def test_create_device_with_sas_returns_device_with_id_keys_and_etag(registry_manager, device_ids):
    device, primary, secondary = _create(registry_manager, device_ids)
    assert device.device_id == device_ids[-1]
    assert device.status == "enabled"
    assert device.authentication.type == "sas"
    assert device.authentication.symmetric_key.primary_key == primary
    assert device.authentication.symmetric_key.secondary_key == secondary
    assert device.etag, "created device has no etag"
    assert device.generation_id, "created device has no generationId"


def test_get_device_returns_the_created_device(registry_manager, device_ids):
    created, primary, secondary = _create(registry_manager, device_ids)
    got = registry_manager.get_device(created.device_id)
    assert got.device_id == created.device_id
    assert got.status == "enabled"
    assert got.etag == created.etag
    assert got.generation_id == created.generation_id
    assert got.authentication.type == "sas"
    assert got.authentication.symmetric_key.primary_key == primary
    assert got.authentication.symmetric_key.secondary_key == secondary


def test_get_devices_lists_the_created_devices(registry_manager, device_ids):
    a, _, _ = _create(registry_manager, device_ids)
    b, _, _ = _create(registry_manager, device_ids)
    devices = registry_manager.get_devices(1000)
    ids = [d.device_id for d in devices]
    assert a.device_id in ids and b.device_id in ids, ids
    assert len(ids) == len(set(ids)), f"duplicates in get_devices: {ids}"


def test_update_device_with_etag_disables_it_and_device_sdk_connect_is_refused(
        registry_manager, device_ids, device_clients, hub):
    created, primary, secondary = _create(registry_manager, device_ids)
    # Enabled: the device SDK connects.
    cs = device_connection_string(hub.hostname, created.device_id, primary)
    ok = device_clients(cs)
    call_with_timeout(ok.connect, CONNECT_TIMEOUT, "connect() while enabled")
    call_with_timeout(ok.disconnect, CONNECT_TIMEOUT, "disconnect()")

    updated = registry_manager.update_device_with_sas(
        created.device_id, created.etag, primary, secondary, "disabled")
    assert updated.device_id == created.device_id
    assert updated.status == "disabled"
    assert updated.etag and updated.etag != created.etag, "etag did not change on update"
    assert registry_manager.get_device(created.device_id).status == "disabled"

    refused = device_clients(cs)
    with pytest.raises(CredentialError):
        call_with_timeout(refused.connect, CONNECT_TIMEOUT, "connect() of a disabled device")


def test_update_device_with_stale_etag_is_rejected_with_412(registry_manager, device_ids):
    created, primary, secondary = _create(registry_manager, device_ids)
    registry_manager.update_device_with_sas(created.device_id, created.etag, primary, secondary,
                                            "disabled")
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.update_device_with_sas(created.device_id, created.etag, primary,
                                                secondary, "enabled")
    assert _status(ei) == 412
    assert registry_manager.get_device(created.device_id).status == "disabled"


def test_delete_device_then_get_device_is_404(registry_manager, device_ids):
    created, _, _ = _create(registry_manager, device_ids)
    registry_manager.delete_device(created.device_id)
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.get_device(created.device_id)
    assert _status(ei) == 404
    ids = [d.device_id for d in registry_manager.get_devices(1000)]
    assert created.device_id not in ids


def test_get_unknown_device_is_404(registry_manager):
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.get_device(new_id("never-created"))
    assert _status(ei) == 404


def test_module_create_get_list_delete(registry_manager, device_ids):
    device, _, _ = _create(registry_manager, device_ids)
    device_id = device.device_id
    module_id = new_id("mod")
    primary, secondary = new_key(), new_key()

    created = registry_manager.create_module_with_sas(device_id, module_id, "", primary, secondary)
    assert created.module_id == module_id
    assert created.device_id == device_id
    assert created.authentication.type == "sas"
    assert created.authentication.symmetric_key.primary_key == primary
    assert created.authentication.symmetric_key.secondary_key == secondary
    assert created.etag, "created module has no etag"

    got = registry_manager.get_module(device_id, module_id)
    assert (got.device_id, got.module_id) == (device_id, module_id)
    assert got.authentication.symmetric_key.primary_key == primary
    assert got.etag == created.etag

    modules = registry_manager.get_modules(device_id)
    assert module_id in [m.module_id for m in modules]

    registry_manager.delete_module(device_id, module_id)
    with pytest.raises(HttpOperationError) as ei:
        registry_manager.get_module(device_id, module_id)
    assert _status(ei) == 404
    assert module_id not in [m.module_id for m in registry_manager.get_modules(device_id)]
    # The device itself is still there.
    assert registry_manager.get_device(device_id).device_id == device_id
