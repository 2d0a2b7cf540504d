"""Telemetry from the official Python device SDK, read back as a back end would: through the
HTTPS event stream (GET /events) and through `ferrohub monitor`."""

import json
import os
import subprocess
import uuid

import requests
from azure.iot.device import Message

from conftest import _server_bin
from ferrohub_helpers import CONNECT_TIMEOUT, SEND_TIMEOUT, call_with_timeout, parse_connection_string


def _owner_token(hub) -> str:
    """A service token signed with the owner policy, as the service SDKs build it."""
    import base64
    import hashlib
    import hmac
    import time
    import urllib.parse

    cs = parse_connection_string(hub.owner_connection_string)
    sr = urllib.parse.quote_plus(cs["HostName"])
    se = str(int(time.time()) + 600)
    sig = base64.b64encode(
        hmac.new(base64.b64decode(cs["SharedAccessKey"]), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    ).decode()
    return f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}&skn={cs['SharedAccessKeyName']}"


def _read_events(hub, device_id: str, want: int, group: str):
    url = f"https://{hub.hostname}:{hub.https_port}/events"
    params = {"api-version": "2021-04-12", "consumerGroup": group, "from": "start", "deviceId": device_id}
    events = []
    with requests.get(url, params=params, headers={"Authorization": _owner_token(hub)},
                      verify=hub.ca_file, stream=True, timeout=(10, 10)) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if line:
                events.append(json.loads(line))
            if len(events) >= want:
                break
    return events


def test_sdk_message_properties_reach_the_event_stream_and_monitor(hub, create_device, device_clients):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    sent = []
    for n in range(3):
        msg = Message(
            json.dumps({"temperature": 20 + n}),
            message_id=str(uuid.uuid4()),
            content_encoding="utf-8",
            content_type="application/json",
        )
        msg.correlation_id = f"corr-{n}"
        msg.custom_properties["alert"] = "high temp"
        msg.custom_properties["level"] = str(n)
        call_with_timeout(lambda: client.send_message(msg), SEND_TIMEOUT, "send_message()")
        sent.append(msg)

    events = _read_events(hub, device_id, 3, "interop-http")
    assert len(events) == 3, events
    for msg, ev in zip(sent, events):
        sysp = ev["systemProperties"]
        assert sysp["message-id"] == msg.message_id
        assert sysp["correlation-id"] == msg.correlation_id
        assert sysp["content-type"] == "application/json"
        assert sysp["content-encoding"] == "utf-8"
        assert sysp["iothub-connection-device-id"] == device_id
        assert json.loads(sysp["iothub-connection-auth-method"]) == {"scope": "device", "type": "sas", "issuer": "iothub"}
        assert ev["properties"] == {"alert": "high temp", "level": msg.custom_properties["level"]}
        assert json.loads(ev["body"]) == json.loads(msg.data)

    # The CLI shows the same events, readable.
    out = subprocess.run(
        [str(_server_bin()), "monitor", "--data-dir", str(hub.data_dir), "--device", device_id,
         "--from", "start", "--count", "3", "--consumer-group", "interop-cli"],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"event from {device_id}") == 3, out.stdout
    assert f"message-id={sent[0].message_id}" in out.stdout
    assert "correlation-id=corr-2" in out.stdout
    assert "alert=high temp" in out.stdout
    assert '"temperature": 21' in out.stdout, "JSON bodies are pretty-printed"
