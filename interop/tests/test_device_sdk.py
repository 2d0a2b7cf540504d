"""The official Python device SDK (azure-iot-device 2.14.0) against ferrohub, unmodified apart
from the host name and the trusted CA (server_verification_cert = the CA's PEM text)."""

import json
import uuid

import pytest
from azure.iot.device import Message
from azure.iot.device.exceptions import CredentialError

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    SEND_TIMEOUT,
    call_with_timeout,
    device_connection_string,
    module_connection_string,
    new_id,
    new_key,
    parse_connection_string,
)


def _telemetry(n: int) -> Message:
    """A message with every field the SDK turns into topic properties that a device usually sets."""
    msg = Message(
        json.dumps({"temperature": 20.5 + n, "seq": n}),
        message_id=str(uuid.uuid4()),
        content_encoding="utf-8",
        content_type="application/json",
    )
    msg.custom_properties["alert"] = "high temp"
    msg.custom_properties["level"] = str(n)
    return msg


def _connect_and_send(client, what: str, messages: int = 2) -> None:
    call_with_timeout(client.connect, CONNECT_TIMEOUT, f"{what}: connect()")
    assert client.connected, f"{what}: connect() returned but the client is not connected"
    for n in range(messages):
        # QoS 1: send_message returns only once the server's PUBACK has arrived.
        call_with_timeout(lambda: client.send_message(_telemetry(n)), SEND_TIMEOUT,
                          f"{what}: send_message() #{n}")
    call_with_timeout(client.disconnect, CONNECT_TIMEOUT, f"{what}: disconnect()")
    assert not client.connected


def test_device_connects_over_mqtt_tls_and_telemetry_with_properties_is_acknowledged(
        create_device, device_clients):
    client = device_clients(create_device())
    _connect_and_send(client, "MQTT/TLS 8883")


def test_device_connects_over_websocket_443_and_telemetry_is_acknowledged(
        create_device, device_clients):
    client = device_clients(create_device(), websockets=True)
    _connect_and_send(client, "MQTT/WebSocket 443")


def test_device_with_wrong_key_is_refused_with_credential_error(
        create_device, device_clients, hub):
    cs = parse_connection_string(create_device())
    wrong = device_connection_string(hub.hostname, cs["DeviceId"], new_key())
    client = device_clients(wrong)
    with pytest.raises(CredentialError):
        call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect() with a wrong key")
    assert not client.connected


def test_unknown_device_is_refused_with_credential_error(device_clients, hub):
    cs = device_connection_string(hub.hostname, new_id("never-created"), new_key())
    client = device_clients(cs)
    with pytest.raises(CredentialError):
        call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect() of an unknown device")


def test_module_client_connects_and_telemetry_is_acknowledged(
        create_device, device_clients, registry_manager, hub):
    device_id = parse_connection_string(create_device())["DeviceId"]
    module_id = new_id("mod")
    key = new_key()
    registry_manager.create_module_with_sas(device_id, module_id, None, key, new_key())
    client = device_clients(module_connection_string(hub.hostname, device_id, module_id, key),
                            module=True)
    _connect_and_send(client, f"module {device_id}/{module_id}")
