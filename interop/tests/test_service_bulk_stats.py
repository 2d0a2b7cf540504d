"""The Python service SDK's statistics and bulk registry calls (azure-iot-hub 2.7.0):
`get_device_registry_statistics`, `get_service_statistics` and
`bulk_create_or_update_devices`, against the session's server."""

from azure.iot.hub.models import AuthenticationMechanism, ExportImportDevice, SymmetricKey

from ferrohub_helpers import CONNECT_TIMEOUT, call_with_timeout, new_id, new_key, wait_until


def test_registry_statistics_count_devices_by_status(registry_manager, create_device):
    before = registry_manager.get_device_registry_statistics()
    create_device()
    create_device(status="disabled")
    after = registry_manager.get_device_registry_statistics()
    assert after.total_device_count == before.total_device_count + 2
    assert after.enabled_device_count == before.enabled_device_count + 1
    assert after.disabled_device_count == before.disabled_device_count + 1
    assert after.total_device_count == after.enabled_device_count + after.disabled_device_count


def test_service_statistics_count_a_connected_device(registry_manager, create_device, device_clients):
    client = device_clients(create_device())
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    stats = registry_manager.get_service_statistics()
    assert stats.connected_device_count >= 1
    call_with_timeout(client.disconnect, CONNECT_TIMEOUT, "disconnect()")
    # Other tests' devices may still be going; this one's leaving must be counted.
    wait_until(lambda: registry_manager.get_service_statistics().connected_device_count
               < stats.connected_device_count, 10, "the count to drop after disconnect")


def test_bulk_create_or_update_devices_applies_each_entry_on_its_own(registry_manager, create_device):
    existing = dict(p.split("=", 1) for p in create_device().split(";"))["DeviceId"]
    primary, secondary = new_key(), new_key()
    keyed, generated = new_id("bulk"), new_id("bulk")
    auth = AuthenticationMechanism(type="sas",
                                   symmetric_key=SymmetricKey(primary_key=primary, secondary_key=secondary))
    entries = [
        ExportImportDevice(id=keyed, import_mode="create", status="enabled", authentication=auth),
        ExportImportDevice(id=generated, import_mode="create", status="disabled"),
        ExportImportDevice(id=existing, import_mode="create"),
        ExportImportDevice(id=new_id("bulk-missing"), import_mode="update"),
    ]
    try:
        result = registry_manager.bulk_create_or_update_devices(entries)
        assert result.is_successful is False
        codes = sorted((e.device_id, e.error_code) for e in result.errors)
        assert codes == sorted([(existing, "DeviceAlreadyExists"), (entries[3].id, "DeviceNotFound")])
        assert all(e.error_status for e in result.errors)
        assert result.warnings == []

        got = registry_manager.get_device(keyed)
        assert got.authentication.symmetric_key.primary_key == primary
        got = registry_manager.get_device(generated)
        assert got.status == "disabled"
        assert got.authentication.symmetric_key.primary_key, "keys are generated when absent"

        result = registry_manager.bulk_create_or_update_devices([
            ExportImportDevice(id=keyed, import_mode="delete"),
            ExportImportDevice(id=generated, import_mode="delete"),
        ])
        assert result.is_successful is True and result.errors == []
    finally:
        for device_id in (keyed, generated):
            try:
                registry_manager.delete_device(device_id)
            except Exception:  # noqa: BLE001 - deleted by the test already
                pass
