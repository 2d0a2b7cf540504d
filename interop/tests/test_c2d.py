"""Cloud-to-device messages: sent over the service REST API (POST .../messages/deviceBound) and
received by the official Python device SDK (azure-iot-device 2.14.0) through
on_message_received. The service SDK's own send_c2d_message speaks AMQP: test_service_amqp.py."""

import base64
import json
import logging
import os
import queue
import subprocess
import time
import uuid

import pytest

from conftest import _server_bin
from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    RECEIVE_TIMEOUT,
    call_with_timeout,
    parse_connection_string,
    send_c2d,
    service_request,
    wait_until,
)

# Values (and a key) the property bag must carry unchanged: characters that are syntax in the
# bag or in the topic (space, '&', '=', '/', '%', '+', '?', '#', '$'), non-ASCII text, and the
# empty string.
TRICKY_PROPERTIES = {
    "plain": "value",
    "spaces-and-syntax": "a b&c=d/e?f#g%h+i$j",
    "unicode": "température ✓ 日本語",
    "empty": "",
    "key with space&=/ü": "v",
}


def _device_id(cs: str) -> str:
    return parse_connection_string(cs)["DeviceId"]


def _set_message_handler(client, handler) -> None:
    """Setting the handler subscribes to devices/{id}/messages/devicebound/# (and waits for the
    SUBACK), connecting first if the client is not connected."""
    call_with_timeout(lambda: setattr(client, "on_message_received", handler), CONNECT_TIMEOUT,
                      "setting on_message_received")


def _get(q: queue.Queue, what: str):
    try:
        return q.get(timeout=RECEIVE_TIMEOUT)
    except queue.Empty:
        raise AssertionError(f"{what}: no C2D message within {RECEIVE_TIMEOUT} s") from None


def _assert_nothing_more(q: queue.Queue, wait: float = 1.5) -> None:
    try:
        extra = q.get(timeout=wait)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected extra C2D message: id={extra.message_id!r} data={extra.data!r}")


def _send_numbered(hub, device_id: str, n: int, tag: str) -> list:
    ids = []
    for i in range(n):
        mid = f"{tag}-{i}-{uuid.uuid4().hex[:8]}"
        r = send_c2d(hub, device_id, {"payload": f"{tag} #{i}", "messageId": mid,
                                      "properties": {"seq": str(i)}})
        assert r["messageId"] == mid
        ids.append(mid)
    return ids


def _collect_feedback(hub, message_id: str, timeout: float = RECEIVE_TIMEOUT) -> dict:
    """Receive and complete feedback batches until the record for message_id shows up."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        r = service_request(hub, "GET", "/messages/serviceBound/feedback")
        if r.status_code == 204:
            time.sleep(0.25)
            continue
        assert r.status_code == 200, f"feedback receive answered {r.status_code}: {r.text}"
        token = r.headers.get("iothub-locktoken")
        assert token, f"feedback batch without iothub-locktoken header: {dict(r.headers)}"
        assert r.headers.get("ETag", "").strip('"') == token, dict(r.headers)
        records = r.json()
        assert isinstance(records, list) and records, records
        done = service_request(hub, "DELETE", f"/messages/serviceBound/feedback/{token}")
        assert done.status_code == 204, f"feedback complete answered {done.status_code}: {done.text}"
        seen.extend(records)
        for rec in records:
            if rec.get("originalMessageId") == message_id:
                return rec
    raise AssertionError(f"no feedback for {message_id} within {timeout} s; received {seen}")


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt-tls-8883", "websocket-443"])
def test_c2d_message_with_system_and_application_properties_reaches_on_message_received(
        hub, create_device, device_clients, registry_manager, websockets):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs, websockets=websockets)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    received = queue.Queue()
    _set_message_handler(client, received.put)

    payload = json.dumps({"command": "set-led", "color": "green", "note": "ünïcode"})
    message_id = str(uuid.uuid4())
    properties = dict(TRICKY_PROPERTIES, nullprop=None)
    answer = send_c2d(hub, device_id, {
        "payload": payload,
        "messageId": message_id,
        "correlationId": "corr-c2d-1",
        "userId": "ops-team",
        "contentType": "application/json",
        "contentEncoding": "utf-8",
        "ttlSeconds": 600,
        "ack": "full",
        "properties": properties,
    })
    assert answer["deviceId"] == device_id
    assert answer["messageId"] == message_id
    assert isinstance(answer["sequenceNumber"], int)
    assert answer["enqueuedTimeUtc"] and answer["expiryTimeUtc"]

    msg = _get(received, "message with properties")
    assert msg.data == payload.encode("utf-8")
    assert msg.message_id == message_id
    assert msg.correlation_id == "corr-c2d-1"
    assert msg.user_id == "ops-team"
    assert msg.content_type == "application/json"
    assert msg.content_encoding == "utf-8"
    assert msg.ack == "full"
    assert msg.expiry_time_utc == answer["expiryTimeUtc"]
    # `$.to` is dropped by the SDK; a null property arrives as a bare key, i.e. None.
    assert msg.custom_properties == properties
    _assert_nothing_more(received)

    # The device SDK PUBACKs after handing the message over; ack=full asks for feedback.
    rec = _collect_feedback(hub, message_id)
    assert rec["statusCode"] == "Success", rec
    assert rec["description"] == "Success", rec
    assert rec["deviceId"] == device_id, rec
    assert rec["deviceGenerationId"] == registry_manager.get_device(device_id).generation_id, rec
    assert rec["enqueuedTimeUtc"], rec


def test_c2d_binary_and_json_payloads(hub, create_device, device_clients):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    received = queue.Queue()
    _set_message_handler(client, received.put)  # connects implicitly

    raw = bytes(range(256))
    send_c2d(hub, device_id, {"payloadBase64": base64.b64encode(raw).decode(), "messageId": "bin"})
    send_c2d(hub, device_id, {"payload": {"a": [1, 2, {"b": None}]}, "messageId": "json"})
    send_c2d(hub, device_id, {"messageId": "empty"})

    got = {}
    for _ in range(3):
        m = _get(received, "payload message")
        got[m.message_id] = m.data
    assert got["bin"] == raw
    assert json.loads(got["json"]) == {"a": [1, 2, {"b": None}]}
    assert got["empty"] in (b"", None, "")


def _subscribes_logged(caplog) -> list:
    """SUBSCRIBEs the device SDK's transport logged (mqtt_transport.py: "subscribing to ...")."""
    return [r.getMessage() for r in caplog.records
            if r.name.endswith("mqtt_transport") and r.getMessage().startswith("subscribing to")]


def test_messages_queued_while_the_same_client_is_disconnected_arrive_on_reconnect(
        hub, create_device, device_clients, caplog):
    """The SDK never re-subscribes after a reconnect (client-compat.md section 1): only the
    subscription the server kept for the clean_session=0 session can deliver these."""
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    received = queue.Queue()
    _set_message_handler(client, received.put)
    call_with_timeout(client.disconnect, CONNECT_TIMEOUT, "disconnect()")
    assert not client.connected

    ids = _send_numbered(hub, device_id, 3, "offline-same-client")
    assert received.empty()

    caplog.set_level(logging.INFO, logger="azure.iot.device.common.mqtt_transport")
    assert any("devicebound" in m for m in _subscribes_logged(caplog)), \
        "the first connection should have subscribed to the C2D topic"
    caplog.clear()
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect() again (no SUBSCRIBE is sent)")
    got = [_get(received, f"queued message #{i}") for i in range(3)]
    assert [m.message_id for m in got] == ids, "queued messages arrive once each, in send order"
    assert [m.custom_properties["seq"] for m in got] == ["0", "1", "2"]
    _assert_nothing_more(received)
    assert _subscribes_logged(caplog) == [], "the SDK re-subscribed: this test proves nothing"


def test_messages_queued_while_offline_arrive_at_a_new_client_after_shutdown(
        hub, create_device, device_clients):
    """A device that ran once with a handler (so its session holds the C2D subscription), shut
    down, and started again as a new process would: a new client object, handler set again."""
    cs = create_device()
    device_id = _device_id(cs)
    first = device_clients(cs)
    first_received = queue.Queue()
    _set_message_handler(first, first_received.put)
    assert first.connected
    call_with_timeout(first.shutdown, CONNECT_TIMEOUT, "first client: shutdown()")

    ids = _send_numbered(hub, device_id, 3, "offline-new-client")

    second = device_clients(cs)
    received = queue.Queue()
    _set_message_handler(second, received.put)  # connects, then subscribes again
    got = [_get(received, f"queued message #{i}") for i in range(3)]
    assert [m.message_id for m in got] == ids, "each queued message exactly once, in order"
    _assert_nothing_more(received)
    assert first_received.empty()

    # And the live path still works on this connection.
    live = send_c2d(hub, device_id, {"payload": "live", "messageId": "live-1"})
    m = _get(received, "live message after the backlog")
    assert (m.message_id, m.data) == (live["messageId"], b"live")


def test_message_waits_for_the_subscription_of_a_connected_device(hub, create_device,
                                                                  device_clients):
    """Connected but not subscribed (a fresh device: its session has no subscription yet): the
    message stays queued and goes out once the handler's SUBSCRIBE arrives."""
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    send_c2d(hub, device_id, {"payload": "waiting", "messageId": "waits-for-subscribe"})
    time.sleep(1.0)
    received = queue.Queue()
    _set_message_handler(client, received.put)
    m = _get(received, "message queued before the SUBSCRIBE")
    assert (m.message_id, m.data) == ("waits-for-subscribe", b"waiting")
    _assert_nothing_more(received)


def test_purge_empties_the_queue_of_an_offline_device(hub, create_device, device_clients):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    received = queue.Queue()
    _set_message_handler(client, received.put)
    call_with_timeout(client.disconnect, CONNECT_TIMEOUT, "disconnect()")

    _send_numbered(hub, device_id, 2, "to-be-purged")
    r = service_request(hub, "DELETE", f"/devices/{device_id}/commands")
    assert r.status_code == 200, r.text
    assert r.json()["totalMessagesPurged"] == 2, r.json()
    assert r.json()["deviceId"] == device_id

    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect() after purge")
    _assert_nothing_more(received, wait=2.0)
    send_c2d(hub, device_id, {"payload": "after purge", "messageId": "after-purge"})
    assert _get(received, "message after purge").message_id == "after-purge"


def test_c2d_send_to_unknown_device_is_404(hub):
    r = service_request(hub, "POST", "/devices/never-created-c2d/messages/deviceBound",
                        json_body={"payload": "x"})
    assert r.status_code == 404, r.text
    assert "DeviceNotFound" in r.text


def test_cli_c2d_send_and_feedback(hub, create_device, device_clients):
    cs = create_device()
    device_id = _device_id(cs)
    client = device_clients(cs)
    received = queue.Queue()
    _set_message_handler(client, received.put)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}

    def cli(*args, timeout=30):
        out = subprocess.run([str(_server_bin()), *args, "--data-dir", str(hub.data_dir)],
                             capture_output=True, text=True, timeout=timeout, env=env)
        assert out.returncode == 0, f"ferrohub {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
        return out.stdout

    sent = cli("c2d", "send", device_id, "--data", "hello from the CLI", "--props", "k=v w",
               "--props", "blank=", "--props", "bare", "--message-id", "cli-1",
               "--content-type", "text/plain", "--ack", "full")
    assert "cli-1" in sent, sent
    m = _get(received, "message sent by the CLI")
    assert m.data == b"hello from the CLI"
    assert m.message_id == "cli-1"
    assert m.content_type == "text/plain"
    assert m.custom_properties == {"k": "v w", "blank": "", "bare": None}

    # Prints one line per record of the batch it received and completes it.
    seen = []

    def feedback_for_cli_1():
        out = cli("c2d", "feedback", "--wait", "5")
        seen.append(out)
        return [line for line in out.splitlines() if "message cli-1" in line]

    lines = wait_until(feedback_for_cli_1, RECEIVE_TIMEOUT, f"feedback for cli-1 (saw {seen})")
    assert lines[0].endswith("Success") and device_id in lines[0], lines
