"""Service-side C2D over AMQP with the official Python service SDK: azure-iot-hub 2.7.0's
IoTHubRegistryManager.send_c2d_message (uamqp 1.6.11, AMQP over TLS on 5671, CBS with the
IoT Hub token convention), received by the Python device SDK through on_message_received, with
its feedback; and the refusals the SDK surfaces as exceptions."""

import queue
import uuid

import pytest

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    RECEIVE_TIMEOUT,
    call_with_timeout,
    parse_connection_string,
    service_request,
    wait_until,
)

SEND_TIMEOUT = 30.0


@pytest.fixture
def amqp_registry_manager(hub, monkeypatch):
    """make(connection_string=owner) -> an IoTHubRegistryManager whose AMQP client trusts the
    hub's CA. uamqp verifies the server against certifi's bundle when it is given no
    certificate, and azure-iot-hub gives it none, so certifi is pointed at the hub's CA (the
    SDK itself is unchanged). Each manager's AMQP connection is closed after the test."""
    import certifi
    from azure.iot.hub import IoTHubRegistryManager

    monkeypatch.setattr(certifi, "where", lambda: hub.ca_file)
    made = []

    def make(cs: str = None):
        rm = IoTHubRegistryManager.from_connection_string(cs or hub.owner_connection_string)
        rm.protocol.config.connection.verify = hub.ca_file
        made.append(rm)
        return rm

    yield make
    for rm in made:
        try:
            rm.amqp_svc_client.disconnect_sync()
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the test's own result
            print(f"warning: closing the AMQP client failed: {e!r}")


def _service_policy_connection_string(hub) -> str:
    """The `service` policy (ServiceConnect only), the one IoT Hub users send C2D with; its key
    is the one in the Event Hubs-compatible connection string hub.json publishes."""
    eh = parse_connection_string(hub.raw["eventhub_connection_string"])
    assert eh["SharedAccessKeyName"] == "service", eh
    return (f"HostName={hub.hostname};SharedAccessKeyName=service;"
            f"SharedAccessKey={eh['SharedAccessKey']}")


def test_send_c2d_message_over_amqp_reaches_the_device_with_its_properties_and_feedback(
        hub, create_device, device_clients, amqp_registry_manager):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    received = queue.Queue()
    call_with_timeout(lambda: setattr(client, "on_message_received", received.put), CONNECT_TIMEOUT,
                      "setting on_message_received")

    rm = amqp_registry_manager(_service_policy_connection_string(hub))
    mid = f"amqp-{uuid.uuid4().hex[:8]}"
    call_with_timeout(lambda: rm.send_c2d_message(device_id, "hello over amqp", properties={
        "messageId": mid,
        "correlationId": "corr-7",
        "contentType": "application/json",
        "contentEncoding": "utf-8",
        "color": "green",
        "iothub-ack": "full",
    }), SEND_TIMEOUT, "send_c2d_message")
    try:
        m = received.get(timeout=RECEIVE_TIMEOUT)
    except queue.Empty:
        raise AssertionError(f"no C2D message within {RECEIVE_TIMEOUT} s") from None
    assert m.data == b"hello over amqp"
    assert m.message_id == mid
    assert m.correlation_id == "corr-7"
    assert m.content_type == "application/json"
    assert m.content_encoding == "utf-8"
    assert m.custom_properties.get("color") == "green", m.custom_properties

    # A second send on the same AMQP connection, with the SDK's own message id.
    call_with_timeout(lambda: rm.send_c2d_message(device_id, "second"), SEND_TIMEOUT,
                      "second send_c2d_message")
    second = received.get(timeout=RECEIVE_TIMEOUT)
    assert second.data == b"second"
    uuid.UUID(second.message_id)  # uamqp's default id: a UUID string

    # The device SDK completed the first message; full feedback was asked for.
    def feedback_for_mid():
        r = service_request(hub, "GET", "/messages/serviceBound/feedback")
        if r.status_code != 200:
            return None
        token = r.headers["iothub-locktoken"]
        service_request(hub, "DELETE", f"/messages/serviceBound/feedback/{token}")
        return next((rec for rec in r.json() if rec.get("originalMessageId") == mid), None)

    record = wait_until(feedback_for_mid, RECEIVE_TIMEOUT, f"feedback for {mid}")
    assert record["statusCode"] == "Success"
    assert record["deviceId"] == device_id


def test_send_c2d_message_refusals_raise(hub, create_device, amqp_registry_manager):
    rm = amqp_registry_manager()
    # Not registered: Rejected (amqp:not-found), which the SDK raises.
    with pytest.raises(Exception, match="C2D message send failure"):
        call_with_timeout(lambda: rm.send_c2d_message(f"nobody-{uuid.uuid4().hex[:6]}", "x"),
                          SEND_TIMEOUT, "send to an unknown device")
    # The connection goes on: a good send after the refusal is accepted.
    device_id = parse_connection_string(create_device())["DeviceId"]
    call_with_timeout(lambda: rm.send_c2d_message(device_id, "after refusal"), SEND_TIMEOUT,
                      "send after a refusal")
    r = service_request(hub, "GET", f"/devices/{device_id}")
    assert r.json()["cloudToDeviceMessageCount"] == 1

    # A wrong key cannot send (its put-token is refused; the Rust tests cover the policies
    # without ServiceConnect, whose keys the data plane does not hand out).
    owner = parse_connection_string(hub.owner_connection_string)
    wrong = (f"HostName={hub.hostname};SharedAccessKeyName={owner['SharedAccessKeyName']};"
             f"SharedAccessKey=d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgISE=")
    with pytest.raises(Exception):
        call_with_timeout(lambda: amqp_registry_manager(wrong).send_c2d_message(device_id, "x"),
                          SEND_TIMEOUT, "send with a wrong key")
    assert service_request(hub, "GET", f"/devices/{device_id}").json()["cloudToDeviceMessageCount"] == 1
