"""A storage routing endpoint read as IoT Hub users read theirs: the Python device SDK sends
telemetry, a route sends it to a storage endpoint, and fastavro (the reader people use for IoT
Hub's Avro blobs) reads the files the hub wrote, in IoT Hub's schema and property names."""

import json
import uuid
from pathlib import Path

import fastavro
from azure.iot.device import Message

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    SEND_TIMEOUT,
    call_with_timeout,
    parse_connection_string,
    service_request,
    wait_until,
)


def _records(container: Path):
    out = []
    for f in sorted(p for p in container.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        with open(f, "rb") as fh:
            out.extend(fastavro.reader(fh))
    return out


def test_routed_sdk_telemetry_is_read_back_with_fastavro(hub, create_device, device_clients):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    name = "avro" + uuid.uuid4().hex[:8]
    container = f"c-{name}"
    r = service_request(hub, "PUT", f"/ferrohub/routing/endpoints/{name}",
                        json_body={"type": "storage", "containerName": container,
                                   "batchFrequencyInSeconds": 1})
    assert r.status_code == 200, r.text
    r = service_request(hub, "PUT", f"/ferrohub/routing/routes/{name}",
                        json_body={"source": "DeviceMessages",
                                   "condition": f"$connectionDeviceId = '{device_id}'",
                                   "endpointNames": [name]})
    assert r.status_code == 200, r.text
    try:
        client = device_clients(cs)
        call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
        sent = []
        for n in range(3):
            msg = Message(json.dumps({"temperature": 20 + n}), message_id=str(uuid.uuid4()),
                          content_encoding="utf-8", content_type="application/json")
            msg.custom_properties["site"] = "lab"
            call_with_timeout(lambda: client.send_message(msg), SEND_TIMEOUT, "send_message()")
            sent.append(msg.message_id)
        folder = hub.data_dir / "storage" / container
        records = wait_until(lambda: (lambda r: r if len(r) >= 3 else None)(_records(folder)),
                             30, "three records in the storage endpoint's Avro files")
        assert [r["SystemProperties"]["messageId"] for r in records] == sent
        first = records[0]
        assert set(first) == {"EnqueuedTimeUtc", "Properties", "SystemProperties", "Body"}
        assert json.loads(first["Body"]) == {"temperature": 20}
        assert first["Properties"]["site"] == "lab"
        sp = first["SystemProperties"]
        assert sp["connectionDeviceId"] == device_id
        assert sp["contentType"] == "application/json"
        assert sp["contentEncoding"] == "utf-8"
        assert first["EnqueuedTimeUtc"].endswith("Z")
        # IoT Hub's default name: {iothub}/{partition}/{YYYY}/{MM}/{DD}/{HH}/{mm}.
        files = [p for p in folder.rglob("*") if p.is_file()]
        rel = files[0].relative_to(folder).parts
        assert len(rel) == 7 and rel[1] == "0" and len(rel[2]) == 4, rel
    finally:
        service_request(hub, "DELETE", f"/ferrohub/routing/routes/{name}")
        service_request(hub, "DELETE", f"/ferrohub/routing/endpoints/{name}")
