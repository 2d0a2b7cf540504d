"""The web explorer in a real headless Chromium against the session hub: sign-in with the
one-time token of `ferrohub explorer` (refused the second time), devices created in the UI and
used by the Python device SDK, live telemetry with its chart, the twin editor's etag conflict
and merge, direct methods, C2D, IoT Plug and Play, models, a read-only policy, logout.

Every check waits for what the page shows (WebDriverWait), never a fixed sleep. Screenshots of
each page go to target/explorer-screenshots/ (kept for CI); with EXPLORER_SCREENSHOTS=<dir> they
are also written there (scripts/explorer-screenshots.sh uses docs/screenshots).
"""

import json
import os
import queue
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import _server_bin
from ferrohub_helpers import (
    CONNECT_TIMEOUT,
    RECEIVE_TIMEOUT,
    SEND_TIMEOUT,
    SHUTDOWN_TIMEOUT,
    call_with_timeout,
    device_connection_string,
    new_id,
    new_key,
    service_request,
)

# Imported outright, not importorskip: a missing browser stack must fail the suite, not skip it.
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from explorer_browser import Browser  # noqa: E402

WAIT = 20
MODEL_ID = "dtmi:com:example:Thermostat;1"
REPO_ROOT = Path(__file__).resolve().parents[2]
THERMOSTAT_MODEL = REPO_ROOT / "examples" / "thermostat" / "Thermostat.json"
# Set by scripts/explorer-screenshots.sh: also write the PNGs there, and give the pages some
# content worth a picture (a few more devices, a longer overview chart).
SCREENSHOTS = os.environ.get("EXPLORER_SCREENSHOTS")


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(hub):
    b = Browser(hub.ca_file, server_cert=str(Path(hub.data_dir) / "certs" / "server.pem"))
    print(f"explorer tests: Chromium trusts the hub's CA via {b.trust}")
    yield b
    b.close()


@pytest.fixture(scope="module")
def shots():
    """shots(name): a PNG of the page now, in target/explorer-screenshots/ (kept after the run,
    so CI keeps them as files), and in $EXPLORER_SCREENSHOTS when set."""
    out = REPO_ROOT / "target" / "explorer-screenshots"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"explorer screenshots: {out}")
    extra = SCREENSHOTS
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
    state = {}

    def shot(name):
        d = state["driver"]
        # Toasts are transient: leave them out of the picture.
        d.execute_script("document.querySelectorAll('.toasts').forEach((t) => t.remove())")
        d.save_screenshot(str(out / f"{name}.png"))
        if extra:
            d.save_screenshot(str(Path(extra) / f"{name}.png"))

    shot.state = state
    shot.dir = out
    return shot


@pytest.fixture
def page(browser, shots, hub, request):
    """The module's browser, signed in as iothubowner through a fresh login token."""
    shots.state["driver"] = browser.driver
    p = Page(browser, hub, shots.dir / f"failed-{request.node.name}.png")
    yield p
    entries = browser.logs()
    csp = [e for e in entries if "Content Security Policy" in e.get("message", "")]
    assert not csp, f"CSP violations on the page: {csp}"


@pytest.fixture(scope="module")
def sdk_clients(hub):
    """make(cs, **kwargs) -> a connected-later SDK device client; all shut down at module end."""
    from azure.iot.device import IoTHubDeviceClient

    made = []

    def make(cs, **kwargs):
        kwargs.setdefault("connection_retry", False)
        c = IoTHubDeviceClient.create_from_connection_string(cs, server_verification_cert=hub.ca_pem, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        try:
            call_with_timeout(c.shutdown, SHUTDOWN_TIMEOUT, "client.shutdown()")
        except BaseException as e:  # noqa: BLE001
            print(f"warning: shutdown failed: {e!r}")


class Page:
    def __init__(self, browser, hub, failure_png=None):
        self.failure_png = failure_png
        self.b = browser
        self.d = browser.driver
        self.hub = hub
        self.base = f"https://{hub.hostname}:{hub.https_port}/explorer"

    # -- waiting and acting --
    def wait(self, cond, what, timeout=WAIT):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: cond())
        except TimeoutException:
            shot = ""
            if self.failure_png:
                try:
                    self.d.save_screenshot(str(self.failure_png))
                    shot = f"\nscreenshot: {self.failure_png}"
                except Exception:  # noqa: BLE001
                    pass
            body = ""
            try:
                body = self.d.find_element(By.TAG_NAME, "body").text[-1500:]
            except Exception:  # noqa: BLE001
                pass
            logs = [e.get("message", "")[:300] for e in self.b.logs()]
            pytest.fail(f"{what}: not within {timeout} s\nURL {self.d.current_url}{shot}\n--- page text ---\n"
                        f"{body}\n--- console ---\n" + "\n".join(logs), pytrace=False)

    def all(self, testid, root=None):
        return (root or self.d).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def el(self, testid, timeout=WAIT, root=None):
        def find():
            for e in self.all(testid, root):
                if e.is_displayed():
                    return e
            return None
        return self.wait(find, f"element [data-testid={testid}] shown", timeout)

    def css(self, selector, timeout=WAIT):
        def find():
            for e in self.d.find_elements(By.CSS_SELECTOR, selector):
                if e.is_displayed():
                    return e
            return None
        return self.wait(find, f"element {selector} shown", timeout)

    def text_of(self, testid, pred, what, timeout=WAIT):
        return self.wait(lambda: (lambda e: e if e and pred(e.text) else None)(
            next((x for x in self.all(testid) if x.is_displayed()), None)), what, timeout)

    def click(self, el):
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        try:
            el.click()
        except ElementClickInterceptedException:
            # A toast over the button: click it the way the user would after it fades.
            self.d.execute_script("arguments[0].click()", el)

    def type(self, el, text):
        el.clear()
        el.send_keys(text)

    def set_value(self, el, text):
        """Put a long text (JSON) into a textarea at once, as a paste does."""
        self.d.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
            el, text)

    def go(self, fragment):
        self.d.get(f"{self.base}#{fragment}")

    # -- signing in --
    def login_url(self):
        r = service_request(self.hub, "POST", "/explorer/api/login-tokens", json_body={})
        assert r.status_code == 200, r.text
        return r.json()["url"]

    def sign_in(self):
        self.d.get(self.login_url())
        self.el("hub-name")
        self.wait(lambda: "token=" not in self.d.current_url, "the token removed from the address")


def _cli(hub, *args, timeout=30):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}
    out = subprocess.run([str(_server_bin()), *args, "--data-dir", str(hub.data_dir)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"ferrohub {' '.join(args)} failed:\n{out.stdout}{out.stderr}"
    return out.stdout


def _connect(client):
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    assert client.connected


def _policy_connection_string(hub, name):
    """The connection string of one of the hub's default policies, read from its database
    (read-only): there is no REST API that lists policies."""
    db = Path(hub.data_dir) / "ferrohub.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute("SELECT doc FROM policies WHERE key_name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:
        row = None
        for (doc,) in con.execute("SELECT doc FROM policies"):
            if json.loads(doc).get("keyName") == name:
                row = (doc,)
    finally:
        con.close()
    assert row, f"policy {name} not in the hub's database"
    key = json.loads(row[0])["primaryKey"]
    return f"HostName={hub.hostname};SharedAccessKeyName={name};SharedAccessKey={key}"


# --- the UI-made device, shared by the tests that use it ----------------------------------------

_ui_device = {}


def _ui_made_device(page, shots, sdk_clients):
    """Creates a SAS device in the UI (once per module) and connects the SDK with the
    connection string the UI shows; returns {id, cs, client, methods, c2d}."""
    if _ui_device:
        return _ui_device
    device_id = new_id("explorer-ui")
    if SCREENSHOTS:
        for name, status in (("thermostat-kitchen", "enabled"), ("sensor-lab-01", "enabled"),
                             ("sensor-lab-02", "disabled"), ("gateway-roof", "enabled")):
            r = service_request(page.hub, "PUT", f"/devices/{name}", json_body={
                "deviceId": name, "status": status,
                "authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key(), "secondaryKey": new_key()}}})
            assert r.status_code in (200, 409), r.text
    page.go("/devices")
    page.click(page.el("new-device"))
    page.type(page.el("create-id"), device_id)
    assert page.el("create-auth-sas").is_selected()
    primary = page.el("create-primary-key").get_attribute("value")
    assert len(primary) == 44 and primary.endswith("="), primary
    page.click(page.el("create-submit"))
    row = page.css(f'tr[data-device-id="{device_id}"]')
    assert "enabled" in row.text
    assert "Disconnected" in row.text

    page.click(row.find_element(By.CSS_SELECTOR, "a.id-link"))
    cs = page.wait(lambda: page.el("cs-primary").get_attribute("value") or None, "connection string shown")
    assert cs == device_connection_string(page.hub.hostname, device_id, primary), cs

    client = sdk_clients(cs)
    methods = queue.Queue()
    c2d = queue.Queue()
    _ui_device.update(id=device_id, cs=cs, client=client, methods=methods, c2d=c2d)
    _connect(client)
    return _ui_device


# --- tests -------------------------------------------------------------------------------------

def test_token_sign_in_lands_on_the_overview_and_the_token_is_single_use(page, shots, hub, create_device):
    create_device()  # at least one device to count
    url = _cli(hub, "explorer").strip().splitlines()[-1]
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == hub.hostname, url
    assert parts.fragment.startswith("token="), url

    page.d.get(url)
    total = page.text_of("ov-devices-total", lambda t: t.strip().isdigit() and int(t) >= 1,
                         "the overview's device count")
    assert int(total.text) >= 1
    assert "token=" not in page.d.current_url
    assert page.d.current_url.endswith("#/overview")
    assert "iothubowner" in page.el("policy").text
    assert hub.hostname in page.el("hub-name").text

    # The same link again: the token was used up, the page says so.
    page.d.get(url)
    err = page.el("login-error")
    assert err.text.strip(), "empty error"
    assert page.el("login-page")


def test_create_sas_device_in_the_ui_and_connect_with_its_connection_string(page, shots, sdk_clients):
    page.sign_in()
    dev = _ui_made_device(page, shots, sdk_clients)
    # The list shows it connected (it polls every 5 s).
    page.go("/devices")
    page.wait(lambda: "Connected" in page.css(f'tr[data-device-id="{dev["id"]}"]').text.replace("Disconnected", ""),
              "the device shown connected", timeout=WAIT)
    shots("devices")
    # The search form builds the query: an id prefix and a status.
    page.type(page.el("search-prefix"), dev["id"][:-3])
    page.click(page.el("search-submit"))
    page.wait(lambda: [r.get_attribute("data-device-id") for r in page.all("device-row")] == [dev["id"]],
              "only the UI-made device listed")
    assert "STARTSWITH(deviceId" in page.all("raw-query")[0].get_attribute("value")
    status = page.el("search-status")
    page.click(status.find_element(By.CSS_SELECTOR, 'option[value="disabled"]'))
    page.text_of("devices-info", lambda t: t == "No devices match.", "no disabled device of that prefix")
    # Identity page: connection state, SAS token generator.
    page.go(f"/devices/{urllib.parse.quote(dev['id'], safe='')}/identity")
    page.click(page.el("sas-generate"))
    token = page.wait(lambda: page.el("sas-token").get_attribute("value") or None, "SAS token generated")
    assert token.startswith("SharedAccessSignature sr=")
    assert urllib.parse.quote(f"{page.hub.hostname}/devices/{dev['id']}", safe="") in token
    shots("device-identity")


def test_module_created_on_the_device_page_has_its_own_connection_string(page, shots, sdk_clients):
    page.sign_in()
    dev = _ui_made_device(page, shots, sdk_clients)
    q = urllib.parse.quote(dev["id"], safe="")
    page.go(f"/devices/{q}/modules")
    page.el("modules-table")
    page.click(page.el("new-module"))
    page.type(page.el("create-id"), "edge-agent")
    primary = page.el("create-primary-key").get_attribute("value")
    page.click(page.el("create-submit"))
    row = page.css('tr[data-testid="module-row"][data-module-id="edge-agent"]')
    page.click(row.find_element(By.CSS_SELECTOR, "a.id-link"))
    cs = page.wait(lambda: page.el("cs-primary").get_attribute("value") or None, "the module's connection string")
    assert cs == f"HostName={page.hub.hostname};DeviceId={dev['id']};ModuleId=edge-agent;SharedAccessKey={primary}", cs
    assert "edge-agent" in page.el("device-title").text
    page.click(page.el("delete-identity"))
    page.click(page.el("confirm-ok"))
    page.el("modules-table")
    page.wait(lambda: not page.d.find_elements(By.CSS_SELECTOR, 'tr[data-module-id="edge-agent"]'),
              "the module gone")


def test_identity_actions_disable_regenerate_and_delete(page, shots, hub, registry_manager):
    device_id = new_id("explorer-id")
    key = new_key()
    registry_manager.create_device_with_sas(device_id, key, new_key(), "enabled")
    q = urllib.parse.quote(device_id, safe="")
    page.sign_in()
    page.go(f"/devices/{q}/identity")
    etag = page.el("identity-etag").text
    assert page.el("cs-primary").get_attribute("value").endswith(key)

    page.click(page.el("toggle-status"))
    page.text_of("identity-status", lambda t: t == "disabled", "the device disabled")
    assert registry_manager.get_device(device_id).status == "disabled"
    assert page.el("identity-etag").text != etag

    page.click(page.el("regen-primary"))
    page.click(page.el("confirm-ok"))
    page.wait(lambda: not page.el("cs-primary").get_attribute("value").endswith(key), "a new primary key shown")
    new_primary = registry_manager.get_device(device_id).authentication.symmetric_key.primary_key
    assert new_primary != key
    assert page.el("cs-primary").get_attribute("value").endswith(new_primary)

    page.click(page.el("delete-identity"))
    page.click(page.el("confirm-ok"))
    page.wait(lambda: page.d.current_url.endswith("#/devices"), "back on the device list")
    r = service_request(hub, "GET", f"/devices/{q}")
    assert r.status_code == 404, r.text


def test_telemetry_shows_in_the_live_table_and_chart(page, shots, sdk_clients):
    from azure.iot.device import Message

    page.sign_in()
    dev = _ui_made_device(page, shots, sdk_clients)
    page.go(f"/devices/{urllib.parse.quote(dev['id'], safe='')}/telemetry")
    page.text_of("tel-state", lambda t: t == "live", "the telemetry stream open")

    def send(i):
        m = Message(json.dumps({"temperature": 20 + i % 5 + i / 10, "humidity": 40 + i % 3, "label": f"n{i}"}))
        m.content_type = "application/json"
        m.content_encoding = "utf-8"
        m.custom_properties["seq"] = str(i)
        call_with_timeout(lambda: dev["client"].send_message(m), SEND_TIMEOUT, "send_message")

    for i in range(6):
        send(i)
        time.sleep(0.3)  # paced like a device, so the chart has a shape
    page.wait(lambda: len(page.all("tel-row")) >= 6, "six telemetry rows")
    rows = page.all("tel-row")
    assert '"temperature"' in rows[0].text and '"seq":"5"' in rows[0].text.replace(" ", ""), rows[0].text
    fields = [e.text for e in page.all("tel-field")]
    assert "temperature" in fields and "humidity" in fields, fields
    assert "label" not in fields
    page.wait(lambda: page.d.find_elements(By.CSS_SELECTOR, '[data-testid="tel-chart"] canvas'), "the chart's canvas")
    legend = page.css('[data-testid="tel-chart"] .u-legend').text
    assert "temperature" in legend and "humidity" in legend, legend
    # More points for a chart worth a look; then the picture.
    for i in range(6, 14):
        send(i)
        time.sleep(0.3)
    page.wait(lambda: len(page.all("tel-row")) >= 14, "fourteen telemetry rows")
    shots("device-telemetry")

    # Pause holds new events back; resume shows them.
    page.click(page.el("tel-pause"))
    send(99)
    page.click(page.el("tel-pause"))
    page.wait(lambda: len(page.all("tel-row")) >= 15, "the held event shown after resume")

    # The overview counts the traffic: rates computed from two polls.
    stop = threading.Event()

    def pump():
        i = 100
        while not stop.is_set():
            send(i)
            i += 1
            stop.wait(0.2)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        page.go("/overview")
        page.text_of("ov-rate-in", lambda x: x not in ("–", "") and float(x.replace(",", "")) > 0,
                     "a telemetry rate above zero", timeout=WAIT)
        page.text_of("ov-devices-connected", lambda x: x.isdigit() and int(x) >= 1, "a connected device")
        page.wait(lambda: page.d.find_elements(By.CSS_SELECTOR, '[data-testid="ov-chart"] canvas'), "the overview chart")
        if SCREENSHOTS:
            # For the README: a few rate points on the chart (one per 2 s poll).
            page.wait(lambda: int(page.el("ov-chart").get_attribute("data-points") or 0) >= 6,
                      "six points on the overview chart", timeout=30)
        shots("overview")
        if SCREENSHOTS:
            # The dark theme (prefers-color-scheme), for the docs.
            page.d.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                   {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
            try:
                shots("overview-dark")
            finally:
                page.d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    finally:
        stop.set()
        t.join(10)


def test_twin_edit_conflict_shows_a_merge_prompt_and_reapplies_on_the_new_etag(page, shots, hub, sdk_clients):
    page.sign_in()
    dev = _ui_made_device(page, shots, sdk_clients)
    q = urllib.parse.quote(dev["id"], safe="")
    page.go(f"/devices/{q}/twin")
    editor = page.el("twin-editor")
    page.wait(lambda: '"desired"' in (editor.get_attribute("value") or ""), "the twin loaded")
    loaded_etag = page.el("twin-etag").text
    doc = json.loads(editor.get_attribute("value"))
    doc["properties"]["desired"]["fromExplorer"] = {"setpoint": 21.5}
    doc["tags"]["site"] = "lab"
    page.set_value(editor, json.dumps(doc, indent=2))

    # Meanwhile someone else changes the twin.
    r = service_request(hub, "PATCH", f"/twins/{q}", json_body={"properties": {"desired": {"fromRest": "hello"}}},
                        headers={"If-Match": "*"})
    assert r.status_code == 200, r.text
    rest_etag = r.json()["etag"]
    assert rest_etag != loaded_etag

    page.click(page.el("twin-save"))
    merge = page.el("twin-merge")
    mine = page.el("merge-mine").text
    theirs = page.el("merge-theirs").text
    assert "fromExplorer" in mine and "site" in mine and "fromRest" not in mine, mine
    assert "fromRest" in theirs, theirs
    assert rest_etag in merge.text
    # The user's edit is still in the editor.
    assert "fromExplorer" in page.el("twin-editor").get_attribute("value")
    shots("twin-merge")

    page.click(page.el("merge-reapply"))
    page.el("twin-saved")
    r = service_request(hub, "GET", f"/twins/{q}")
    twin = r.json()
    desired = twin["properties"]["desired"]
    assert desired["fromRest"] == "hello", desired
    assert desired["fromExplorer"] == {"setpoint": 21.5}, desired
    assert twin["tags"]["site"] == "lab", twin
    page.text_of("twin-etag", lambda t: t == twin["etag"], "the new etag shown")
    assert not page.all("twin-merge")


def test_direct_method_from_the_ui_is_answered_by_the_device(page, shots, sdk_clients):
    from azure.iot.device import MethodResponse

    page.sign_in()
    dev = _ui_made_device(page, shots, sdk_clients)
    client = dev["client"]
    calls = []

    def handler(req):
        calls.append(req)
        client.send_method_response(MethodResponse.create_from_method_request(
            req, 201, {"answer": 42, "echo": req.payload}))

    call_with_timeout(lambda: setattr(client, "on_method_request_received", handler), CONNECT_TIMEOUT,
                      "setting on_method_request_received")
    page.go(f"/devices/{urllib.parse.quote(dev['id'], safe='')}/methods")
    page.type(page.el("method-name"), "calibrate")
    page.set_value(page.el("method-payload"), '{"level": 3}')
    page.type(page.el("method-response-timeout"), "15")
    page.click(page.el("method-invoke"))
    page.text_of("method-status", lambda t: t == "201", "the method's status")
    out = json.loads(page.el("method-payload-out").text)
    assert out == {"answer": 42, "echo": {"level": 3}}, out
    assert page.el("method-latency").text.endswith(" ms")
    assert [c.name for c in calls] == ["calibrate"] and calls[0].payload == {"level": 3}
    shots("device-method")


def test_c2d_sent_from_the_ui_reaches_the_device_with_feedback(page, shots, sdk_clients):
    page.sign_in()
    dev = _ui_made_device(page, shots, sdk_clients)
    client = dev["client"]
    received = queue.Queue()
    call_with_timeout(lambda: setattr(client, "on_message_received", received.put), CONNECT_TIMEOUT,
                      "setting on_message_received")
    page.go(f"/devices/{urllib.parse.quote(dev['id'], safe='')}/c2d")
    page.set_value(page.el("c2d-payload"), "hello from the explorer")
    message_id = page.el("c2d-message-id").get_attribute("value")
    page.type(page.el("c2d-prop-name"), "color")
    page.type(page.el("c2d-prop-value"), "blue")
    page.type(page.el("c2d-content-type"), "text/plain")
    ack = page.el("c2d-ack")
    page.click(ack.find_element(By.CSS_SELECTOR, 'option[value="full"]'))
    page.type(page.el("c2d-ttl"), "600")
    page.click(page.el("c2d-send"))
    assert message_id in page.el("c2d-result").text
    try:
        m = received.get(timeout=RECEIVE_TIMEOUT)
    except queue.Empty:
        pytest.fail("the C2D message did not reach the device", pytrace=False)
    assert m.data == b"hello from the explorer"
    assert m.message_id == message_id
    assert m.custom_properties.get("color") == "blue", m.custom_properties
    assert m.content_type == "text/plain"
    # The SDK completes what it receives: positive feedback comes back and the page shows it.
    page.wait(lambda: any("Success" in e.text for e in page.all("c2d-feedback")), "feedback shown", timeout=30)
    page.d.execute_script("window.scrollTo(0, 0)")
    shots("device-c2d")


def test_plug_and_play_device_shows_model_components_properties_and_commands(page, shots, hub, registry_manager,
                                                                            sdk_clients):
    from azure.iot.device import Message, MethodResponse

    r = service_request(hub, "POST", "/models", json_body=json.loads(THERMOSTAT_MODEL.read_text()))
    assert r.status_code == 200, r.text
    device_id = new_id("explorer-pnp")
    key = new_key()
    registry_manager.create_device_with_sas(device_id, key, new_key(), "enabled")
    try:
        client = sdk_clients(device_connection_string(hub.hostname, device_id, key), product_info=MODEL_ID)
        _connect(client)

        def handler(req):
            client.send_method_response(MethodResponse.create_from_method_request(req, 200, {
                "maxTemp": 25.5, "minTemp": 19.0, "avgTemp": 22.1,
                "startTime": req.payload or "2026-01-01T00:00:00Z", "endTime": "2026-12-02T00:00:00Z"}))

        call_with_timeout(lambda: setattr(client, "on_method_request_received", handler), CONNECT_TIMEOUT,
                          "setting on_method_request_received")

        def desired(patch):
            # The PnP convention: acknowledge a writable property with ac/av/ad.
            if "targetTemperature" in patch:
                client.patch_twin_reported_properties({"targetTemperature": {
                    "value": patch["targetTemperature"], "ac": 200, "av": patch["$version"], "ad": "applied"}})

        call_with_timeout(lambda: setattr(client, "on_twin_desired_properties_patch_received", desired),
                          CONNECT_TIMEOUT, "setting on_twin_desired_properties_patch_received")
        call_with_timeout(lambda: client.patch_twin_reported_properties({
            "maxTempSinceLastReboot": 30.5,
            "targetTemperature": {"value": 22, "ac": 200, "av": 1, "ad": "set at boot"}}),
            SEND_TIMEOUT, "patch reported")
        m = Message(json.dumps({"temperature": 22.4}))
        m.content_type = "application/json"
        m.content_encoding = "utf-8"
        call_with_timeout(lambda: client.send_message(m), SEND_TIMEOUT, "send_message")

        page.sign_in()
        page.go(f"/devices/{urllib.parse.quote(device_id, safe='')}/pnp")
        assert page.el("pnp-model-id").text == MODEL_ID
        chips = [e.text for e in page.all("pnp-component-chip")]
        assert chips == ["Default component"], chips
        target = page.css('tr[data-testid="pnp-property"][data-name="targetTemperature"]')
        page.wait(lambda: "200 / 1 / set at boot" in target.text, "the ack of targetTemperature")
        assert "22" in target.find_element(By.CSS_SELECTOR, '[data-testid="pnp-reported"]').text
        # A desired value set in the UI is acknowledged by the device: in sync.
        inp = page.el("pnp-desired-input-targetTemperature")
        inp.send_keys("23.5")
        page.click(target.find_element(By.CSS_SELECTOR, 'button[type="submit"]'))
        row = lambda: page.css('tr[data-testid="pnp-property"][data-name="targetTemperature"]')  # noqa: E731
        page.wait(lambda: "in sync" in row().text and "23.5" in row().find_element(
            By.CSS_SELECTOR, '[data-testid="pnp-desired"]').text, "targetTemperature in sync at 23.5", timeout=WAIT)
        assert "applied" in row().text
        maxrow = page.css('tr[data-testid="pnp-property"][data-name="maxTempSinceLastReboot"]')
        assert "30.5" in maxrow.text
        cmd = page.css('[data-testid="pnp-command"][data-name="getMaxMinReport"]')
        assert cmd.find_elements(By.CSS_SELECTOR, '[data-testid="cmd-input-since"]'), "the since input"
        page.click(page.el("cmd-invoke-getMaxMinReport"))
        page.text_of("cmd-status", lambda t: t == "200", "the command's status")
        assert json.loads(page.el("cmd-payload").text)["maxTemp"] == 25.5
        page.el("pnp-conformance")
        # Telemetry charted under the model's display name and unit.
        page.wait(lambda: any("Temperature (°C)" in e.text for e in page.all("tel-field")),
                  "the model's telemetry field", timeout=WAIT)
        page.d.execute_script("window.scrollTo(0, 0)")
        shots("pnp")
    finally:
        try:
            registry_manager.delete_device(device_id)
        except Exception:  # noqa: BLE001
            pass


def test_models_page_adds_and_removes_a_model(page, shots):
    page.sign_in()
    model_id = f"dtmi:com:example:explorertest:{new_id('m').replace('-', '')};1"
    model = {
        "@context": "dtmi:dtdl:context;2", "@id": model_id, "@type": "Interface", "displayName": "Explorer test",
        "contents": [{"@type": "Telemetry", "name": "level", "schema": "double"},
                     {"@type": "Property", "name": "mode", "schema": "string", "writable": True}],
    }
    page.go("/models")
    page.set_value(page.el("model-json"), json.dumps(model, indent=2))
    page.click(page.el("model-add"))
    assert model_id in page.el("model-added").text
    row = page.css(f'tr[data-model-id="{model_id}"]')
    assert "Explorer test" in row.text
    shots("models")
    page.click(row.find_element(By.CSS_SELECTOR, '[data-testid="model-remove"]'))
    page.click(page.el("confirm-ok"))
    page.wait(lambda: not page.d.find_elements(By.CSS_SELECTOR, f'tr[data-model-id="{model_id}"]'),
              "the model gone from the list")


def test_read_only_policy_has_no_create_or_delete_controls(page, shots, hub, create_device):
    cs = create_device()
    device_id = dict(p.split("=", 1) for p in cs.split(";"))["DeviceId"]
    page.d.get(page.base)
    if page.all("logout"):
        page.click(page.el("logout"))
    page.el("login-page")
    page.type(page.el("login-connection-string"), _policy_connection_string(hub, "registryRead"))
    page.click(page.el("login-submit"))
    page.text_of("policy", lambda t: "registryRead" in t, "signed in as registryRead")
    page.go("/devices")
    page.css(f'tr[data-device-id="{device_id}"]')
    assert not page.all("new-device")
    assert "RegistryWrite" in page.el("rights-note").text
    page.go(f"/devices/{urllib.parse.quote(device_id, safe='')}/identity")
    page.el("identity-auth")
    assert not page.all("delete-identity") and not page.all("toggle-status") and not page.all("regen-primary")
    page.go(f"/devices/{urllib.parse.quote(device_id, safe='')}/c2d")
    assert "ServiceConnect" in page.el("rights-note").text
    assert not page.all("c2d-send")
    page.go("/models")
    page.el("models-table")
    assert not page.all("model-add") and not page.all("model-remove")

    # A wrong key is refused with the hub's message.
    page.click(page.el("logout"))
    page.type(page.el("login-connection-string"), f"HostName={hub.hostname};SharedAccessKeyName=registryRead;"
                                                   f"SharedAccessKey={new_key()}")
    page.click(page.el("login-submit"))
    assert page.el("login-error").text.strip()


def test_logout_returns_to_the_login_page(page, shots):
    page.sign_in()
    page.click(page.el("logout"))
    page.el("login-page")
    shots("login")
    # The session is gone on the server too: a reload shows the login page.
    page.d.get(f"{page.base}#/devices")
    page.el("login-page")
    assert not page.all("hub-name")


def test_the_live_view_keeps_up_with_a_device_sending_100_messages_a_second(page, shots, create_device,
                                                                             device_clients):
    from azure.iot.device import Message

    cs = create_device()
    device_id = cs.split("DeviceId=")[1].split(";")[0]
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    page.sign_in()
    page.go(f"/devices/{urllib.parse.quote(device_id, safe='')}/telemetry")
    page.text_of("tel-state", lambda t: t == "live", "the telemetry stream open")
    total = 500
    start = time.monotonic()
    for i in range(total):
        # Paced at 100 messages a second, as the device sends them.
        time.sleep(max(0.0, start + i / 100 - time.monotonic()))
        m = Message(json.dumps({"temperature": 20 + (i % 50) / 10, "i": i}))
        m.content_type = "application/json"
        m.content_encoding = "utf-8"
        call_with_timeout(lambda: client.send_message(m), SEND_TIMEOUT, "send_message")
    rate = total / (time.monotonic() - start)
    print(f"sent {total} messages at {rate:.0f}/s")
    # Every event reached the page, the table kept its last 200, the chart every point.
    page.text_of("tel-count", lambda t: t == f"{total} events", f"all {total} events counted", timeout=30)
    assert len(page.all("tel-row")) == 200
    page.wait(lambda: int(page.el("tel-chart").get_attribute("data-points") or 0) >= total,
              "a chart point per message")
    # And the page still answers: pausing holds the next one back, resuming shows it.
    page.click(page.el("tel-pause"))
    m = Message(json.dumps({"temperature": 1, "i": total}))
    m.content_type = "application/json"
    m.content_encoding = "utf-8"
    call_with_timeout(lambda: client.send_message(m), SEND_TIMEOUT, "send_message")
    page.click(page.el("tel-pause"))
    page.text_of("tel-count", lambda t: t == f"{total + 1} events", "the held event after resume")
    shots("device-telemetry-100-per-second")
