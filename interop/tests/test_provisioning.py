"""Device provisioning against ferrohub's DPS-compatible endpoint with the official, unmodified
Python SDK (azure-iot-device 2.14.0's ProvisioningDeviceClient): provisioning host and trusted
CA are the only changes. A group member registers with its derived key, an individual
enrollment with its own key, a CA group member and an individual X.509 enrollment with their
certificates (made with the openssl command); each gets `assigned`, then IoTHubDeviceClient
connects to the assigned hub as the assigned device and sends telemetry. The provisioning
payload's modelId reaches the twin."""

import base64
import hashlib
import hmac
import json
import urllib.parse

import pytest
from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError, ServiceError

from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    SEND_TIMEOUT,
    SHUTDOWN_TIMEOUT,
    call_with_timeout,
    new_id,
    service_request,
)

REGISTER_TIMEOUT = 60
MODEL_ID = "dtmi:com:example:Thermostat;1"


def _derive(group_key: str, registration_id: str) -> str:
    """The device key DPS derives for a group member (the DPS docs' recipe)."""
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def _put(hub, path: str, body: dict) -> dict:
    r = service_request(hub, "PUT", path, json_body=body)
    assert r.status_code == 200, f"PUT {path} answered {r.status_code}: {r.text}"
    return r.json()


def _scope(hub) -> str:
    scope = hub.raw.get("dps_id_scope")
    assert scope, f"hub.json has no dps_id_scope: {hub.raw}"
    return scope


def _register(hub, registration_id: str, key: str, payload=None, websockets=False):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=hub.hostname,
        registration_id=registration_id,
        id_scope=_scope(hub),
        symmetric_key=key,
        server_verification_cert=hub.ca_pem,
        websockets=websockets,
    )
    if payload is not None:
        client.provisioning_payload = payload
    # register() connects, registers, polls and disconnects (the client has no shutdown()).
    return call_with_timeout(client.register, REGISTER_TIMEOUT, f"register({registration_id})")


def _connect_and_send(hub, result, key: str) -> None:
    state = result.registration_state
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=key,
        hostname=state.assigned_hub,
        device_id=state.device_id,
        server_verification_cert=hub.ca_pem,
        connection_retry=False,
    )
    try:
        call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect() to the assigned hub")
        assert client.connected
        call_with_timeout(lambda: client.send_message(Message('{"temperature": 21.5}')),
                          SEND_TIMEOUT, "send_message()")
    finally:
        call_with_timeout(client.shutdown, SHUTDOWN_TIMEOUT, "device shutdown()")


def _twin(hub, device_id: str) -> dict:
    r = service_request(hub, "GET", f"/twins/{urllib.parse.quote(device_id, safe='')}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("websockets", [False, True], ids=["mqtt-tls-8883", "mqtt-ws-443"])
def test_group_member_registers_with_derived_key_then_connects_and_sends(hub, websockets):
    group_id = new_id("grp")
    group = _put(hub, f"/enrollmentGroups/{group_id}", {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey"},
        "initialTwin": {"tags": {"site": "interop"}, "properties": {"desired": {"interval": 7}}},
    })
    registration_id = new_id("member")
    key = _derive(group["attestation"]["symmetricKey"]["primaryKey"], registration_id)

    result = _register(hub, registration_id, key, payload={"modelId": MODEL_ID},
                       websockets=websockets)

    assert result.status == "assigned"
    state = result.registration_state
    assert state.device_id == registration_id
    assert state.assigned_hub == hub.hostname
    assert state.sub_status == "initialAssignment"
    # The SDK hands the payload back as JSON text.
    assert json.loads(state.response_payload) == {"modelId": MODEL_ID}
    _connect_and_send(hub, result, key)
    twin = _twin(hub, registration_id)
    assert twin.get("modelId") == MODEL_ID
    assert twin["tags"]["site"] == "interop"
    assert twin["properties"]["desired"]["interval"] == 7


def test_individual_enrollment_registers_and_connects_as_its_device_id(hub):
    registration_id = new_id("solo")
    device_id = new_id("solo-device")
    enrollment = _put(hub, f"/enrollments/{registration_id}", {
        "registrationId": registration_id,
        "deviceId": device_id,
        "attestation": {"type": "symmetricKey"},
    })
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]

    result = _register(hub, registration_id, key)

    assert result.status == "assigned"
    assert result.registration_state.device_id == device_id
    _connect_and_send(hub, result, key)
    # Registering again is idempotent: the same device, still reachable with the same key.
    again = _register(hub, registration_id, key)
    assert again.status == "assigned"
    assert again.registration_state.device_id == device_id
    _connect_and_send(hub, again, key)


def test_a_wrong_key_is_refused(hub):
    registration_id = new_id("solo")
    _put(hub, f"/enrollments/{registration_id}", {
        "registrationId": registration_id,
        "attestation": {"type": "symmetricKey"},
    })
    wrong = base64.b64encode(b"\x01" * 32).decode()
    # The SDK wraps the service's refusal: ClientError("Unexpected failure") from
    # ServiceError("register request returned a service error status code 401").
    with pytest.raises(ClientError) as raised:
        _register(hub, registration_id, wrong)
    cause = raised.value.__cause__
    assert isinstance(cause, ServiceError) and "401" in str(cause), repr(cause)


def _openssl(*args, cwd):
    import subprocess
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _self_signed(tmp_path, cn: str):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{cn}.key", "-out", f"{cn}.pem", "-subj", f"/CN={cn}", "-days", "2",
             "-addext", "extendedKeyUsage=clientAuth", cwd=tmp_path)
    return tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"


def _ca_signed(tmp_path, cn: str):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Interop Root", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp_path)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{cn}.key", "-out", f"{cn}.csr", "-subj", f"/CN={cn}", cwd=tmp_path)
    (tmp_path / "leaf.ext").write_text("extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{cn}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{cn}.pem", "-days", "2", "-extfile", "leaf.ext",
             cwd=tmp_path)
    return tmp_path / "ca.pem", tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key"


def _register_x509(hub, registration_id: str, cert_file, key_file):
    from azure.iot.device import X509
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=hub.hostname,
        registration_id=registration_id,
        id_scope=_scope(hub),
        x509=X509(cert_file=str(cert_file), key_file=str(key_file)),
        server_verification_cert=hub.ca_pem,
    )
    return call_with_timeout(client.register, REGISTER_TIMEOUT, f"register({registration_id})")


def _connect_and_send_x509(hub, result, cert_file, key_file) -> None:
    from azure.iot.device import X509
    state = result.registration_state
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=str(cert_file), key_file=str(key_file)),
        hostname=state.assigned_hub,
        device_id=state.device_id,
        server_verification_cert=hub.ca_pem,
        connection_retry=False,
    )
    try:
        call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect() to the assigned hub")
        call_with_timeout(lambda: client.send_message(Message('{"x509": true}')),
                          SEND_TIMEOUT, "send_message()")
    finally:
        call_with_timeout(client.shutdown, SHUTDOWN_TIMEOUT, "device shutdown()")


def test_ca_group_member_registers_with_a_ca_signed_certificate(hub, tmp_path):
    registration_id = new_id("x509-member")
    ca_pem, cert_file, key_file = _ca_signed(tmp_path, registration_id)
    group_id = new_id("x509-grp")
    _put(hub, f"/enrollmentGroups/{group_id}", {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "x509",
                        "x509": {"signingCertificates": {"primary": {"certificate": ca_pem.read_text()}}}},
    })

    result = _register_x509(hub, registration_id, cert_file, key_file)

    assert result.status == "assigned"
    assert result.registration_state.device_id == registration_id
    _connect_and_send_x509(hub, result, cert_file, key_file)


def test_individual_x509_enrollment_registers_with_its_certificate(hub, tmp_path):
    registration_id = new_id("x509-solo")
    cert_file, key_file = _self_signed(tmp_path, registration_id)
    _put(hub, f"/enrollments/{registration_id}", {
        "registrationId": registration_id,
        "attestation": {"type": "x509",
                        "x509": {"clientCertificates": {"primary": {"certificate": cert_file.read_text()}}}},
    })

    result = _register_x509(hub, registration_id, cert_file, key_file)

    assert result.status == "assigned"
    _connect_and_send_x509(hub, result, cert_file, key_file)


@pytest.mark.parametrize("transport", ["mqtt", "http"])
def test_node_provisioning_client_registers(hub, transport):
    """azure-iot-provisioning-device (Node) with its MQTT or HTTP transport and a group member's
    derived key (interop/node/provision.js); trust from NODE_EXTRA_CA_CERTS, set explicitly."""
    import os
    import subprocess
    from pathlib import Path

    node_dir = Path(__file__).resolve().parents[1] / "node"
    if not (node_dir / "node_modules" / "azure-iot-provisioning-device").is_dir():
        pytest.fail("interop/node/node_modules lacks the provisioning SDK: run interop/run.sh "
                    "(it runs npm ci)", pytrace=False)
    group_id = new_id("node-grp")
    group = _put(hub, f"/enrollmentGroups/{group_id}", {
        "enrollmentGroupId": group_id,
        "attestation": {"type": "symmetricKey"},
    })
    registration_id = new_id("node-member")
    key = _derive(group["attestation"]["symmetricKey"]["primaryKey"], registration_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}
    env["NODE_EXTRA_CA_CERTS"] = hub.ca_file
    proc = subprocess.run(
        ["node", str(node_dir / "provision.js"), transport, hub.hostname, _scope(hub), registration_id, key,
         json.dumps({"modelId": MODEL_ID})],
        cwd=node_dir, env=env, capture_output=True, text=True, timeout=REGISTER_TIMEOUT)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (code {proc.returncode}); stderr:\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert "error" not in result, f"{result}\nstderr:\n{proc.stderr}"
    assert result["status"] == "assigned", result
    assert result["deviceId"] == registration_id
    assert result["assignedHub"] == hub.hostname
    assert result["payload"] == {"modelId": MODEL_ID}
    assert _twin(hub, registration_id).get("modelId") == MODEL_ID
