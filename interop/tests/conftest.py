"""Starts one real ferrohub server for the whole session and gives the tests SDK clients for it.

The Python device SDK hard-codes ports 8883 (MQTT/TLS) and 443 (MQTT over WebSocket), so the
server runs on those ports, bound to loopback. The server binary comes from $FERROHUB_BIN
(default <repo>/target/debug/ferrohub; a relative path is taken from the repo root).
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ferrohub_helpers import (
    SHUTDOWN_TIMEOUT,
    Hub,
    call_with_timeout,
    device_connection_string,
    new_id,
    new_key,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MQTT_ADDR = ("127.0.0.1", 8883)
HTTPS_ADDR = ("127.0.0.1", 443)
AMQP_ADDR = ("127.0.0.1", 5671)
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 120

# Set once the server is up; read by the report hook to attach the server log to failures.
_server_log_path = None
_log_offset_key = pytest.StashKey[int]()


def _server_bin() -> Path:
    raw = os.environ.get("FERROHUB_BIN") or "target/debug/ferrohub"
    p = Path(raw)
    return p if p.is_absolute() else REPO_ROOT / p


def _port_open(addr) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = LOG_TAIL_LINES, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    text = data.decode("utf-8", errors="replace").splitlines()
    if not text:
        return "<no server output>"
    cut = len(text) - lines
    head = [f"... ({cut} earlier lines in {path})"] if cut > 0 else []
    return "\n".join(head + text[-lines:])


def _read_hub_json(path: Path):
    """The parsed hub.json, or None while it is missing or still being written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A running ferrohub server; the value is its hub.json as a `Hub`."""
    global _server_log_path

    binary = _server_bin()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"ferrohub binary not found: {binary} (cargo build -p ferrohub, or set FERROHUB_BIN)",
                    pytrace=False)
    busy = [f"{h}:{p}" for h, p in (MQTT_ADDR, HTTPS_ADDR, AMQP_ADDR) if _port_open((h, p))]
    if busy:
        pytest.fail(f"port(s) {', '.join(busy)} already in use before the server started: is another "
                    f"server running? (ss -ltnp)", pytrace=False)

    data_dir = tmp_path_factory.mktemp("ferrohub")
    log_path = data_dir / "server.log"
    cmd = [
        str(binary), "serve",
        "--data-dir", str(data_dir),
        "--hostname", "localhost",
        "--mqtt-bind", f"{MQTT_ADDR[0]}:{MQTT_ADDR[1]}",
        "--https-bind", f"{HTTPS_ADDR[0]}:{HTTPS_ADDR[1]}",
        "--amqp-bind", f"{AMQP_ADDR[0]}:{AMQP_ADDR[1]}",
    ]
    # Only the flags above configure the server: drop FERROHUB_* settings from the caller's
    # environment, and run it in the data dir so no stray ./ferrohub.toml is picked up.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}
    env.setdefault("RUST_LOG", "info,ferrohub=debug")
    # The server's own log filter variable (RUST_LOG is not read by ferrohub); the caller's
    # FERROHUB_LOG, if any, still wins.
    env["FERROHUB_LOG"] = os.environ.get("FERROHUB_LOG") or env["RUST_LOG"]
    env.setdefault("RUST_BACKTRACE", "1")
    env.setdefault("NO_COLOR", "1")  # plain text in server.log
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=data_dir, env=env)
    _server_log_path = log_path

    def startup_failure(why: str):
        _stop(proc)
        log.close()
        pytest.fail(f"{why}\ncommand: {' '.join(cmd)}\n--- server output ({log_path}) ---\n"
                    f"{_tail(log_path, 200)}", pytrace=False)

    hub_json = data_dir / "hub.json"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    raw = None
    while True:
        rc = proc.poll()
        if rc is not None:
            startup_failure(f"ferrohub exited with code {rc} during start-up")
        if raw is None:
            raw = _read_hub_json(hub_json)
        if raw is not None and _port_open(MQTT_ADDR) and _port_open(HTTPS_ADDR) and _port_open(AMQP_ADDR):
            break
        if time.monotonic() > deadline:
            state = (f"hub.json {'present' if raw is not None else 'missing/unparsable'}, "
                     f"{MQTT_ADDR[1]} {'open' if _port_open(MQTT_ADDR) else 'closed'}, "
                     f"{HTTPS_ADDR[1]} {'open' if _port_open(HTTPS_ADDR) else 'closed'}")
            startup_failure(f"ferrohub not ready within {STARTUP_TIMEOUT:.0f} s ({state})")
        time.sleep(0.1)

    missing = [k for k in ("hostname", "ca_file", "owner_connection_string") if not raw.get(k)]
    if missing:
        startup_failure(f"hub.json lacks {missing}: {raw}")
    ca_file = raw["ca_file"]
    try:
        ca_pem = Path(ca_file).read_text()
    except OSError as e:
        startup_failure(f"hub.json ca_file {ca_file!r} is not readable: {e}")

    yield Hub(
        hostname=raw["hostname"],
        mqtt_port=raw.get("mqtt_port", MQTT_ADDR[1]),
        https_port=raw.get("https_port", HTTPS_ADDR[1]),
        ca_file=ca_file,
        ca_pem=ca_pem,
        owner_connection_string=raw["owner_connection_string"],
        pid=raw.get("pid", proc.pid),
        data_dir=data_dir,
        log_path=log_path,
        raw=raw,
    )

    crashed = proc.poll()
    _stop(proc)
    log.close()
    if crashed is not None:
        pytest.fail(f"ferrohub exited on its own during the run (code {crashed})\n"
                    f"--- server output ({log_path}) ---\n{_tail(log_path, 200)}", pytrace=False)


@pytest.fixture(scope="session")
def registry_manager(hub):
    """IoTHubRegistryManager on the owner connection string, trusting the server's CA for REST."""
    from azure.iot.hub import IoTHubRegistryManager

    rm = IoTHubRegistryManager.from_connection_string(hub.owner_connection_string)
    # client-compat.md section 3: msrest passes this to requests as `verify`.
    rm.protocol.config.connection.verify = hub.ca_file
    rm.protocol.config.connection.timeout = 20
    # Report the server's first answer, not the last of several retries.
    rm.protocol.config.retry_policy.retries = 0
    yield rm


@pytest.fixture
def create_device(registry_manager, hub):
    """create_device(status="enabled") -> device connection string of a new device with a fresh
    random id (`HostName=localhost;DeviceId=...;SharedAccessKey=<primary key>`).
    Devices made this way are deleted (best effort) after the test."""
    created = []

    def _create(status: str = "enabled") -> str:
        device_id = new_id("interop")
        primary = new_key()
        registry_manager.create_device_with_sas(device_id, primary, new_key(), status)
        created.append(device_id)
        return device_connection_string(hub.hostname, device_id, primary)

    yield _create
    for device_id in created:
        try:
            registry_manager.delete_device(device_id)
        except Exception:  # noqa: BLE001 - already deleted by the test, or the server is gone
            pass


@pytest.fixture
def device_clients(hub):
    """make(cs, module=False, **kwargs) -> an SDK client trusting the server's CA, created with
    connection_retry=False. Every client made is shut down after the test."""
    from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient

    clients = []

    def make(cs: str, module: bool = False, **kwargs):
        cls = IoTHubModuleClient if module else IoTHubDeviceClient
        kwargs.setdefault("connection_retry", False)
        client = cls.create_from_connection_string(cs, server_verification_cert=hub.ca_pem, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        try:
            call_with_timeout(client.shutdown, SHUTDOWN_TIMEOUT, "client.shutdown()")
        except BaseException as e:  # noqa: BLE001 - cleanup must not hide the test's own result
            print(f"warning: shutting down {client!r} failed: {e!r}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if _server_log_path is not None:
        try:
            item.stash[_log_offset_key] = _server_log_path.stat().st_size
        except OSError:
            pass
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and _server_log_path is not None:
        start = item.stash.get(_log_offset_key, 0)
        report.sections.append(
            (f"ferrohub server log during this test ({_server_log_path})",
             _tail(_server_log_path, LOG_TAIL_LINES, start)))
    return report


@pytest.fixture(scope="session")
def configuration_manager(hub):
    """IoTHubConfigurationManager on the owner connection string, trusting the server's CA."""
    from azure.iot.hub import IoTHubConfigurationManager

    cm = IoTHubConfigurationManager.from_connection_string(hub.owner_connection_string)
    cm.protocol.config.connection.verify = hub.ca_file
    cm.protocol.config.connection.timeout = 20
    cm.protocol.config.retry_policy.retries = 0
    yield cm
