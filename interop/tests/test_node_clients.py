"""The official Node service clients, unmodified, against the same server: azure-iothub 1.16.6
(`Client.send` with `ack: 'full'`, its feedback through `Client.getFeedbackReceiver`, over
AMQP on rhea without SASL, on 5671 and over WebSocket on 443 with the `AmqpWs` transport) and @azure/event-hubs 6.0.4 (`EventHubConsumerClient` on the Event
Hubs-compatible connection string). The scripts are in interop/node/; the devices are the
Python device SDK's. Trust comes from NODE_EXTRA_CA_CERTS, set to the hub's CA explicitly."""

import json
import os
import queue
import subprocess
import uuid
from pathlib import Path

import pytest

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    RECEIVE_TIMEOUT,
    call_with_timeout,
    parse_connection_string,
)

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
SCRIPT_TIMEOUT = 60.0


def _env(hub, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}
    env["NODE_EXTRA_CA_CERTS"] = hub.ca_file
    env.update(extra)
    return env


def _service_cs(hub) -> str:
    eh = parse_connection_string(hub.raw["eventhub_connection_string"])
    return f"HostName={hub.hostname};SharedAccessKeyName=service;SharedAccessKey={eh['SharedAccessKey']}"


def _node(hub, script: str, *args, **env) -> subprocess.Popen:
    if not (NODE_DIR / "node_modules").is_dir():
        pytest.fail("interop/node/node_modules is missing: run interop/run.sh (it runs npm ci)",
                    pytrace=False)
    return subprocess.Popen(["node", str(NODE_DIR / script), *args], cwd=NODE_DIR, env=_env(hub, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen, what: str) -> dict:
    """The script's next stdout line as JSON (the scripts bound their own run time)."""
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=SCRIPT_TIMEOUT)
        raise AssertionError(f"{what}: the Node script ended (code {proc.returncode}) without output; "
                             f"stderr:\n{proc.stderr.read()}")
    value = json.loads(line)
    assert "error" not in value, f"{what}: {value}\nstderr:\n{proc.stderr.read()}"
    return value


def _finish(proc: subprocess.Popen) -> None:
    try:
        rc = proc.wait(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, f"Node script exited with {rc}; stderr:\n{proc.stderr.read()}"


@pytest.mark.parametrize("transport", ["amqp", "amqp-ws"], ids=["amqp-tls-5671", "amqp-websocket-443"])
def test_node_client_send_with_full_ack_gets_its_feedback(hub, create_device, device_clients, transport):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    received = queue.Queue()
    call_with_timeout(lambda: setattr(client, "on_message_received", received.put), CONNECT_TIMEOUT,
                      "setting on_message_received")

    mid = f"node-{uuid.uuid4().hex[:8]}"
    proc = _node(hub, "c2d.js", "send-with-feedback", SERVICE_CS=_service_cs(hub), DEVICE_ID=device_id,
                 MESSAGE_ID=mid, TRANSPORT=transport)
    try:
        _line(proc, "Client.send")
        try:
            m = received.get(timeout=RECEIVE_TIMEOUT)
        except queue.Empty:
            raise AssertionError("the device got no message from Client.send") from None
        assert m.message_id == mid
        assert json.loads(m.data) == {"from": "node"}
        assert m.content_type == "application/json"
        assert m.custom_properties.get("sdk") == "node", m.custom_properties
        # The device SDK completes the message (PUBACK): Success feedback for the back end.
        got = _line(proc, "getFeedbackReceiver")
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got["contentType"] == "application/vnd.microsoft.iothub.feedback.json"
    assert got["feedback"]["statusCode"] == "Success"
    assert got["feedback"]["deviceId"] == device_id


def test_node_client_send_to_an_unknown_device_fails_with_device_not_found(hub):
    proc = _node(hub, "c2d.js", "send-unknown", SERVICE_CS=_service_cs(hub),
                 DEVICE_ID=f"nobody-{uuid.uuid4().hex[:6]}")
    try:
        got = _line(proc, "Client.send to an unknown device")
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got.get("refused") == "DeviceNotFoundError", got


def test_node_event_hubs_consumer_reads_the_device_telemetry(hub, create_device, device_clients):
    from azure.iot.device import Message

    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    sent = []
    for i in range(3):
        m = Message(json.dumps({"n": i}), message_id=f"nd-{i}", content_encoding="utf-8",
                    content_type="application/json")
        m.custom_properties["k"] = f"v{i}"
        call_with_timeout(lambda: client.send_message(m), CONNECT_TIMEOUT, "send_message")
        sent.append(m)

    proc = _node(hub, "eventhub_read.js", EVENTHUB_CS=hub.raw["eventhub_connection_string"],
                 DEVICE_ID=device_id, COUNT="3")
    try:
        got = _line(proc, "EventHubConsumerClient")
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got["partitionIds"] == [str(p) for p in range(len(got["partitionIds"]))]
    assert got["properties"]["partitionIds"] == got["partitionIds"]
    events = got["events"]
    assert [e["messageId"] for e in events] == ["nd-0", "nd-1", "nd-2"]
    for i, e in enumerate(events):
        assert e["body"] == {"n": i} or json.loads(e["body"]) == {"n": i}, e
        assert e["contentType"] == "application/json"
        assert e["properties"] == {"k": f"v{i}"}
        assert e["systemProperties"]["iothub-connection-device-id"] == device_id
        assert e["systemProperties"]["iothub-connection-auth-method"]
    offsets = [int(e["offset"]) for e in events]
    assert offsets == sorted(offsets) and len(set(e["partitionId"] for e in events)) == 1
