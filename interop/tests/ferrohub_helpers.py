"""Small helpers shared by the interop tests and conftest.py (no pytest fixtures here)."""

import base64
import hashlib
import hmac
import secrets
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Per-call ceilings for SDK calls. The device SDK itself waits 60 s for a CONNACK and has no
# timeout at all on some operations, so every blocking SDK call goes through call_with_timeout.
CONNECT_TIMEOUT = 30
SEND_TIMEOUT = 30
SHUTDOWN_TIMEOUT = 15
# How long a test waits for something the server pushes (C2D message, desired patch, feedback).
RECEIVE_TIMEOUT = 15

API_VERSION = "2021-04-12"


@dataclass
class Hub:
    """What the running server published in <data-dir>/hub.json, plus the CA's PEM text."""

    hostname: str
    mqtt_port: int
    https_port: int
    ca_file: str
    ca_pem: str
    owner_connection_string: str
    pid: int
    data_dir: Path
    log_path: Path
    raw: dict = field(repr=False, default_factory=dict)


def new_key() -> str:
    """A fresh symmetric key: base64 of 32 random bytes, as the Azure portal makes them."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def device_connection_string(hostname: str, device_id: str, key: str) -> str:
    return f"HostName={hostname};DeviceId={device_id};SharedAccessKey={key}"


def module_connection_string(hostname: str, device_id: str, module_id: str, key: str) -> str:
    return f"HostName={hostname};DeviceId={device_id};ModuleId={module_id};SharedAccessKey={key}"


def parse_connection_string(cs: str) -> dict:
    """`A=1;B=2` -> {"A": "1", "B": "2"} (values may contain '=', as base64 keys do)."""
    out = {}
    for part in cs.split(";"):
        if part:
            k, _, v = part.partition("=")
            out[k] = v
    return out


def call_with_timeout(fn, timeout: float, what: str):
    """Run fn() in a daemon thread; fail the test if it has not returned within `timeout` s.

    Returns fn's result, or re-raises its exception in the calling thread (so
    `pytest.raises(...)` works around it).
    """
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as is
            result["error"] = e

    t = threading.Thread(target=run, name=f"sdk-call: {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not return within {timeout} s (hang)", pytrace=False)
    if "error" in result:
        raise result["error"]
    return result.get("value")


def service_token(hub: "Hub", ttl: int = 600) -> str:
    """A service SAS token signed with the owner policy, built as the service SDKs build it."""
    cs = parse_connection_string(hub.owner_connection_string)
    sr = urllib.parse.quote_plus(cs["HostName"])
    se = str(int(time.time()) + ttl)
    sig = base64.b64encode(
        hmac.new(base64.b64decode(cs["SharedAccessKey"]), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    ).decode()
    return (f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(sig, safe='')}&se={se}"
            f"&skn={cs['SharedAccessKeyName']}")


def service_request(hub: "Hub", method: str, path: str, *, json_body=None, headers=None,
                    timeout: float = 20):
    """One call to the service REST API as the owner (for what azure-iot-hub cannot do:
    C2D over REST, feedback, fields its models drop such as the twin's modelId)."""
    import requests

    h = {"Authorization": service_token(hub)}
    h.update(headers or {})
    return requests.request(method, f"https://{hub.hostname}:{hub.https_port}{path}",
                            params={"api-version": API_VERSION}, json=json_body, headers=h,
                            verify=hub.ca_file, timeout=timeout)


def send_c2d(hub: "Hub", device_id: str, body: dict, module_id: str = None) -> dict:
    """POST .../messages/deviceBound; returns the hub's answer (messageId, sequenceNumber, ...)."""
    q = urllib.parse.quote
    path = f"/devices/{q(device_id, safe='')}"
    if module_id is not None:
        path += f"/modules/{q(module_id, safe='')}"
    r = service_request(hub, "POST", path + "/messages/deviceBound", json_body=body)
    assert r.status_code == 200, f"C2D send answered {r.status_code}: {r.text}"
    return r.json()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll predicate() until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s", pytrace=False)
        time.sleep(interval)
