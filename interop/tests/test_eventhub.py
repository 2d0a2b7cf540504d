"""The Event Hubs-compatible endpoint (AMQP over TLS on 5671) read by the official, unmodified
`azure-eventhub` consumer with the connection string the hub prints: partition metadata, and
device telemetry (sent by the Python device SDK) read from the start, from an offset, from an
enqueued time and from @latest, with IoT Hub's annotations."""

import json
import queue
import threading
import uuid

import pytest
from azure.eventhub import EventHubConsumerClient, TransportType
from azure.eventhub.exceptions import AuthenticationError
from azure.iot.device import Message

from ferrohub_helpers import CONNECT_TIMEOUT, SEND_TIMEOUT, call_with_timeout, parse_connection_string

RECEIVE_TIMEOUT = 20.0


@pytest.fixture
def eventhub_cs(hub, monkeypatch):
    """The hub's Event Hubs-compatible connection string; the CA variables point at the hub's
    CA (set, not defaulted, so a caller's own bundle cannot hide a TLS mistake)."""
    monkeypatch.setenv("SSL_CERT_FILE", hub.ca_file)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", hub.ca_file)
    cs = hub.raw.get("eventhub_connection_string")
    assert cs and cs.startswith(f"Endpoint=sb://{hub.hostname}/;"), hub.raw
    return cs


def _consumer(hub, cs, **kwargs):
    return EventHubConsumerClient.from_connection_string(
        cs, consumer_group="$Default", connection_verify=hub.ca_file, **kwargs)


def _partition_of(device_id: str, partitions: int) -> str:
    """The hub's partitioning (FNV-1a of the device id), to read the device's one partition."""
    h = 0x811C9DC5
    for b in device_id.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return str(h % partitions)


class Reader:
    """consumer.receive() on one partition in a thread; events land in a queue."""

    def __init__(self, hub, cs, partition, starting_position, inclusive=False, track_last=False,
                 **client_kwargs):
        self.client = _consumer(hub, cs, **client_kwargs)
        self.events = queue.Queue()
        self.ready = threading.Event()
        self.errors = []
        # With track_last: the partition context's last_enqueued_event_properties, per event.
        self.last_enqueued = {}

        def on_event(ctx, ev):
            if track_last:
                self.last_enqueued[ev.sequence_number] = ctx.last_enqueued_event_properties
            self.events.put(ev)

        def on_error(_ctx, err):
            self.errors.append(err)

        self.thread = threading.Thread(daemon=True, target=lambda: self.client.receive(
            on_event=on_event, on_error=on_error, partition_id=partition,
            starting_position=starting_position, starting_position_inclusive=inclusive,
            on_partition_initialize=lambda _ctx: self.ready.set(), prefetch=10,
            track_last_enqueued_event_properties=track_last))
        self.thread.start()

    def next_of(self, device_id, timeout=RECEIVE_TIMEOUT):
        """The next event of `device_id` (other tests' devices may share the partition)."""
        while True:
            try:
                ev = self.events.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no event of {device_id} within {timeout} s; errors: {self.errors}")
            if ev.system_properties.get(b"iothub-connection-device-id") == device_id.encode():
                return ev

    def close(self):
        if self.thread is not None:
            self.client.close()
            self.thread.join(10)
            self.thread = None


@pytest.fixture
def readers():
    made = []

    def make(*args, **kwargs):
        r = Reader(*args, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _send(client, n):
    msg = Message(json.dumps({"n": n}), message_id=str(uuid.uuid4()),
                  content_encoding="utf-8", content_type="application/json")
    msg.custom_properties["alert"] = "high temp"
    msg.custom_properties["level"] = str(n)
    call_with_timeout(lambda: client.send_message(msg), SEND_TIMEOUT, "send_message()")
    return msg


def test_partition_ids_and_properties(hub, eventhub_cs):
    client = _consumer(hub, eventhub_cs)
    try:
        ids = call_with_timeout(client.get_partition_ids, CONNECT_TIMEOUT, "get_partition_ids()")
        assert ids == ["0", "1", "2", "3"]
        props = call_with_timeout(client.get_eventhub_properties, CONNECT_TIMEOUT, "get_eventhub_properties()")
        assert props["eventhub_name"] == parse_connection_string(eventhub_cs)["EntityPath"]
        assert props["partition_ids"] == ids
        p = call_with_timeout(lambda: client.get_partition_properties("1"), CONNECT_TIMEOUT,
                              "get_partition_properties()")
        assert p["id"] == "1"
        assert p["is_empty"] == (p["last_enqueued_sequence_number"] == -1)
    finally:
        client.close()


def test_telemetry_from_start_offset_time_and_latest(hub, eventhub_cs, create_device, device_clients, readers):
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    partition = _partition_of(device_id, 4)
    device = device_clients(cs)
    call_with_timeout(device.connect, CONNECT_TIMEOUT, "connect()")
    sent = [_send(device, n) for n in range(3)]

    # From the start: every event, with IoT Hub's annotations and the device's properties.
    start = readers(hub, eventhub_cs, partition, "-1")
    got = [start.next_of(device_id) for _ in sent]
    for msg, ev in zip(sent, got):
        sp = ev.system_properties
        assert sp[b"message-id"] == msg.message_id.encode()
        assert sp[b"content-type"] == b"application/json"
        assert sp[b"content-encoding"] == b"utf-8"
        assert sp[b"iothub-connection-device-id"] == device_id.encode()
        assert json.loads(sp[b"iothub-connection-auth-method"]) == {"scope": "device", "type": "sas", "issuer": "iothub"}
        assert sp[b"iothub-message-source"] == b"Telemetry"
        assert b"iothub-enqueuedtime" in sp and b"iothub-connection-auth-generation-id" in sp
        assert ev.properties == {b"alert": b"high temp", b"level": msg.custom_properties["level"].encode()}
        assert json.loads(ev.body_as_str()) == {"n": json.loads(msg.data)["n"]}
        assert ev.partition_key is None
    assert [e.sequence_number for e in got] == sorted(e.sequence_number for e in got)
    # Each reader is closed once done: Event Hubs allows five per partition and group.
    start.close()

    # From an offset (exclusive, the SDK's default): resumes right after it, nothing repeated.
    after = readers(hub, eventhub_cs, partition, got[0].offset)
    assert after.next_of(device_id).sequence_number == got[1].sequence_number
    after.close()
    # Inclusive offset.
    incl = readers(hub, eventhub_cs, partition, got[1].offset, inclusive=True)
    assert incl.next_of(device_id).sequence_number == got[1].sequence_number
    incl.close()
    # From a sequence number.
    seq = readers(hub, eventhub_cs, partition, got[1].sequence_number)
    assert seq.next_of(device_id).sequence_number == got[2].sequence_number
    seq.close()
    # From an enqueued time (inclusive): nothing enqueued before it.
    t = readers(hub, eventhub_cs, partition, got[2].enqueued_time, inclusive=True)
    first = t.next_of(device_id)
    assert first.enqueued_time >= got[2].enqueued_time
    assert first.sequence_number >= got[1].sequence_number
    t.close()

    # @latest: only what is sent after the receiver opened; it arrives live (no polling).
    # The SDK reports a partition initialized before its link is attached, and what is sent
    # in between is rightly not delivered: send until one arrives, then check that nothing
    # older came first.
    latest = readers(hub, eventhub_cs, partition, "@latest")
    assert latest.ready.wait(RECEIVE_TIMEOUT), "the @latest receiver never initialized"
    newer = []
    ev = None
    for n in range(10):
        newer.append(_send(device, 100 + n))
        try:
            ev = latest.next_of(device_id, timeout=2.0)
            break
        except AssertionError:
            continue
    assert ev is not None, f"@latest receiver got nothing; errors: {latest.errors}"
    assert ev.sequence_number > got[2].sequence_number
    assert ev.system_properties[b"message-id"] in {m.message_id.encode() for m in newer}


def test_last_enqueued_event_properties_are_tracked(hub, eventhub_cs, create_device, device_clients,
                                                    readers):
    """track_last_enqueued_event_properties=True: the receiver asks for runtime metrics and every
    event carries the partition's newest event (sequence number, offset, time)."""
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    device = device_clients(cs)
    call_with_timeout(device.connect, CONNECT_TIMEOUT, "connect()")
    _send(device, 1)
    _send(device, 2)
    partition = _partition_of(device_id, 4)
    client = _consumer(hub, eventhub_cs)
    try:
        props = call_with_timeout(lambda: client.get_partition_properties(partition), CONNECT_TIMEOUT,
                                  "get_partition_properties()")
    finally:
        client.close()
    r = readers(hub, eventhub_cs, partition, "-1", track_last=True)
    first = r.next_of(device_id)
    last = r.last_enqueued[first.sequence_number]
    assert last is not None, "no runtime metrics with the event"
    assert last["sequence_number"] >= props["last_enqueued_sequence_number"] >= first.sequence_number
    assert last["offset"] == str(last["sequence_number"])
    assert last["enqueued_time"] is not None and last["retrieval_time"] is not None


def test_over_websocket(hub, eventhub_cs, create_device, device_clients, readers):
    """The same endpoint over AMQP over WebSocket (443, `/$servicebus/websocket`, AMQPWSB10)."""
    client = _consumer(hub, eventhub_cs, transport_type=TransportType.AmqpOverWebsocket)
    try:
        ids = call_with_timeout(client.get_partition_ids, CONNECT_TIMEOUT, "get_partition_ids()")
        assert ids == ["0", "1", "2", "3"]
    finally:
        client.close()
    cs = create_device()
    device_id = parse_connection_string(cs)["DeviceId"]
    device = device_clients(cs)
    call_with_timeout(device.connect, CONNECT_TIMEOUT, "connect()")
    msg = _send(device, 7)
    r = readers(hub, eventhub_cs, _partition_of(device_id, 4), "-1",
                transport_type=TransportType.AmqpOverWebsocket)
    assert r.next_of(device_id).system_properties[b"message-id"] == msg.message_id.encode()


def test_a_wrong_key_is_refused(hub, eventhub_cs):
    fields = dict(f.split("=", 1) for f in eventhub_cs.split(";") if f)
    fields["SharedAccessKey"] = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgISE="
    bad = ";".join(f"{k}={v}" for k, v in fields.items())
    client = _consumer(hub, bad, retry_total=0)
    try:
        # The put-token on $cbs is answered 401, which the SDK raises as AuthenticationError.
        with pytest.raises(AuthenticationError):
            call_with_timeout(client.get_partition_ids, CONNECT_TIMEOUT, "get_partition_ids()")
    finally:
        client.close()
