#!/usr/bin/env python3
"""Helpers for scripts/soak.sh, standard library only (matplotlib only for `report --png`).

  desired  DATA_DIR OUT.jsonl [--devices N --rate R --prefix P]
      Service twin updates (PATCH /twins/{id}, desired properties) at a fixed rate over keep-alive
      HTTPS, one JSON line per interval: successes, failures, p50/p99 latency.
  abuse    DATA_DIR OUT.jsonl [--rate R]
      Malformed clients, round-robin over the kinds in ABUSES: garbage on the MQTT and HTTPS
      ports, broken TLS, bad CONNECTs, bad REST requests and tokens, clients that never send
      CONNECT. Each attempt is "expected" when the hub refused it as it should, "unexpected"
      otherwise (e.g. a bad token accepted); one JSON line per interval with counts per kind.
  sample   PID OUT_DIR CSV --interval S --until EPOCH
      Every S seconds: server RSS, fds, threads, CPU; the latency figures and operation counts
      of every load loop's RESULT lines that appeared since the last sample; failures; WARN and
      ERROR lines of the server log. One CSV row per sample.
  report   CSV SUMMARY.json [--png FILE | --svg FILE] [--warmup S]
      Summary, pass/fail checks (RSS growth, fd growth), plot. Exit 1 when a check fails.
"""

import argparse
import base64
import concurrent.futures
import csv
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import socket
import ssl
import statistics
import sys
import threading
import time
import urllib.parse
import warnings

API = "api-version=2021-04-12"


# ---------------------------------------------------------------------------------------------
# Reaching the hub


class Hub:
    def __init__(self, data_dir):
        with open(os.path.join(data_dir, "hub.json")) as f:
            j = json.load(f)
        self.mqtt_port = j["mqtt_port"]
        self.https_port = j["https_port"]
        self.ca_file = os.path.join(data_dir, j["ca_file"])
        cs = dict(p.split("=", 1) for p in j["owner_connection_string"].split(";") if "=" in p)
        self.host_name = cs["HostName"]
        self.policy = cs["SharedAccessKeyName"]
        self.key = cs["SharedAccessKey"]
        self.hostname = j.get("hostname") or self.host_name.split(":")[0]

    def token(self, key=None, expiry=3600, resource=None):
        resource = resource or self.host_name
        se = int(time.time()) + expiry
        sr = urllib.parse.quote(resource, safe="")
        sig = hmac.new(base64.b64decode(key or self.key), f"{sr}\n{se}".encode(), hashlib.sha256)
        sig = urllib.parse.quote(base64.b64encode(sig.digest()).decode(), safe="")
        return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={self.policy}"

    def ssl_context(self):
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return ctx

    def https(self, timeout=30):
        return http.client.HTTPSConnection("127.0.0.1", self.https_port, timeout=timeout,
                                           context=self._named_context())

    def _named_context(self):
        # The certificate names localhost and 127.0.0.1; connect by address, check the name.
        return self.ssl_context()


def request(conn, method, path, body=None, headers=None):
    """One request on a keep-alive connection; returns (status, body bytes)."""
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    return r.status, r.read()


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(1, int(-(-p * len(sorted_vals) // 100)))
    return sorted_vals[min(k, len(sorted_vals)) - 1]


class IntervalLog:
    """Appends one JSON line per interval, flushed, so a reader sees whole lines only."""

    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def write(self, obj):
        obj["t"] = round(time.time(), 3)
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()


# ---------------------------------------------------------------------------------------------
# desired: service twin updates


def cmd_desired(a):
    hub = Hub(a.data_dir)
    out = IntervalLog(a.out)
    auth = {"Authorization": hub.token(expiry=48 * 3600)}
    ids = [f"{a.prefix}{i}" for i in range(a.devices)]
    conn = hub.https()
    for d in ids:  # create, or keep when it exists (409)
        body = json.dumps({"deviceId": d, "authentication": {"type": "sas"}})
        st, b = request(conn, "PUT", f"/devices/{d}?{API}", body, auth)
        if st not in (200, 201, 409):
            print(f"desired: creating {d}: HTTP {st} {b[:200]!r}", file=sys.stderr)
            sys.exit(1)
    period = 1.0 / a.rate
    nxt = time.monotonic()
    last_emit = time.monotonic()
    ok = err = 0
    lat = []
    errors = {}
    n = 0
    while True:
        now = time.monotonic()
        if now < nxt:
            time.sleep(nxt - now)
        nxt += period
        if nxt < time.monotonic() - 1:  # fell behind by a second: do not burst to catch up
            nxt = time.monotonic()
        d = ids[n % len(ids)]
        n += 1
        body = json.dumps({"properties": {"desired": {"soak": n, "at": time.time()}}})
        t0 = time.monotonic()
        try:
            st, b = request(conn, "PATCH", f"/twins/{d}?{API}", body, auth)
            if st == 200:
                ok += 1
                lat.append((time.monotonic() - t0) * 1000)
            else:
                err += 1
                k = f"HTTP {st}"
                errors[k] = errors.get(k, 0) + 1
        except (OSError, http.client.HTTPException) as e:
            err += 1
            k = type(e).__name__
            errors[k] = errors.get(k, 0) + 1
            conn.close()
            conn = hub.https()
        if time.monotonic() - last_emit >= a.interval:
            lat.sort()
            out.write({"ok": ok, "err": err, "errors": errors, "p50": pct(lat, 50),
                       "p99": pct(lat, 99), "max": lat[-1] if lat else None})
            ok = err = 0
            lat = []
            errors = {}
            last_emit = time.monotonic()


# ---------------------------------------------------------------------------------------------
# abuse: malformed clients


def mqtt_len(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def mqtt_str(s):
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id, username=None, password=None, level=4, name="MQTT"):
    flags = 0x02
    payload = mqtt_str(client_id)
    if username is not None:
        flags |= 0x80
        payload += mqtt_str(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_str(password)
    var = mqtt_str(name) + bytes([level, flags]) + (60).to_bytes(2, "big")
    body = var + payload
    return bytes([0x10]) + mqtt_len(len(body)) + body


class Abuser:
    def __init__(self, hub):
        self.hub = hub
        self.ctx = hub.ssl_context()
        self.ctx.check_hostname = True

    # -- helpers
    def tcp(self, port, timeout=5):
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        return s

    def tls(self, port=None, timeout=5):
        raw = self.tcp(port or self.hub.mqtt_port, timeout)
        return self.ctx.wrap_socket(raw, server_hostname="localhost")

    @staticmethod
    def closed_or_refused(s, timeout=35):
        """True when the peer closes the connection within `timeout` (after a TLS alert or a
        CONNACK refusal, if it sends one); False when it keeps it open or accepts a CONNECT.
        The default outlasts the hub's own limits (10 s for a TLS handshake, 30 s for CONNECT),
        as junk can be a plausible start: a handshake message announcing more records, a
        packet header announcing more bytes, which the hub rightly waits for until then."""
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        first = b""
        while time.monotonic() < deadline:
            try:
                data = s.recv(256)
            except socket.timeout:
                return False
            except (ConnectionError, ssl.SSLError, OSError):
                return True
            if not data:
                return True
            if not first:
                first = data
                if first[:4] == b"\x20\x02\x00\x00":  # CONNACK accepted: must not happen
                    return False
        return False

    @staticmethod
    def garbage(n, avoid):
        """n random bytes whose first is not in `avoid` (which would make them a plausible start
        the hub rightly waits on: a TLS handshake record, an MQTT CONNECT)."""
        data = bytearray(os.urandom(n))
        while data[0] in avoid:
            data[0] = random.randrange(256)
        return bytes(data)

    # -- the kinds; each returns True when the hub behaved as expected
    def mqtt_garbage_tcp(self):
        s = self.tcp(self.hub.mqtt_port)
        try:
            s.sendall(self.garbage(random.randint(1, 4096), {0x16}))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def https_garbage_tcp(self):
        s = self.tcp(self.hub.https_port)
        try:
            s.sendall(self.garbage(random.randint(1, 4096), {0x16}))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def tls_truncated_hello(self):
        # A real ClientHello, cut short, then the socket closed.
        inc, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.ctx.wrap_bio(inc, outb, server_hostname="localhost")
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outb.read()
        s = self.tcp(random.choice([self.hub.mqtt_port, self.hub.https_port]))
        try:
            s.sendall(hello[: random.randint(1, max(1, len(hello) - 1))])
            time.sleep(0.05)
        finally:
            s.close()
        return True

    def tls_bad_record(self):
        # A TLS record header announcing a handshake, followed by junk.
        s = self.tcp(self.hub.mqtt_port)
        try:
            s.sendall(b"\x16\x03\x01\x00\x40" + os.urandom(64))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def tls_old_version(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            try:
                ctx.minimum_version = ssl.TLSVersion.TLSv1
            except ValueError:
                pass
        raw = self.tcp(self.hub.mqtt_port)
        try:
            ctx.wrap_socket(raw, server_hostname="localhost").close()
            return False  # the hub must not speak TLS < 1.2
        except (ssl.SSLError, OSError):
            return True
        finally:
            raw.close()

    def tls_untrusted_client_abort(self):
        # The client does not trust the server's certificate and aborts the handshake.
        ctx = ssl.create_default_context()  # system roots: the dev CA is not among them
        raw = self.tcp(self.hub.mqtt_port)
        try:
            ctx.wrap_socket(raw, server_hostname="localhost").close()
            return False
        except ssl.SSLCertVerificationError:
            return True
        except (ssl.SSLError, OSError):
            return True
        finally:
            raw.close()

    def mqtt_tls_garbage(self):
        s = self.tls()
        try:
            s.sendall(self.garbage(random.randint(1, 2048), set(range(0x10, 0x20))))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def connect_bad_password(self):
        s = self.tls()
        try:
            dev = f"soak-tel-{random.randint(0, 9)}"
            s.sendall(connect_packet(dev, f"localhost/{dev}/?{API}",
                                     "SharedAccessSignature sr=x&sig=bad&se=1"))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def connect_unknown_device(self):
        s = self.tls()
        try:
            dev = f"nobody-{random.randint(0, 1 << 30)}"
            tok = self.hub.token(key=base64.b64encode(os.urandom(32)).decode(),
                                 resource=f"localhost/devices/{dev}")
            s.sendall(connect_packet(dev, f"localhost/{dev}/?{API}", tok))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def connect_bad_protocol(self):
        s = self.tls()
        try:
            s.sendall(connect_packet("x", "localhost/x/?" + API, "p", level=random.choice([3, 5, 99]),
                                     name=random.choice(["MQTT", "MQIsdp", "HTTP"])))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def connect_huge_length(self):
        s = self.tls()
        try:
            s.sendall(b"\x10\xff\xff\xff\x7f" + os.urandom(100))
            return self.closed_or_refused(s)
        finally:
            s.close()

    def publish_before_connect(self):
        s = self.tls()
        try:
            topic = mqtt_str("devices/x/messages/events/")
            s.sendall(bytes([0x32]) + mqtt_len(len(topic) + 2 + 5) + topic + b"\x00\x01hello")
            return self.closed_or_refused(s)
        finally:
            s.close()

    def half_connect_then_close(self):
        s = self.tls()
        try:
            pkt = connect_packet("y", "localhost/y/?" + API, "p")
            s.sendall(pkt[: len(pkt) // 2])
            time.sleep(0.05)
        finally:
            s.close()
        return True

    def rest_no_auth(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "GET", f"/devices?{API}")
            return st == 401
        finally:
            c.close()

    def rest_bad_token(self):
        c = self.hub.https(10)
        try:
            tok = self.hub.token(key=base64.b64encode(os.urandom(32)).decode())
            st, _ = request(c, "GET", f"/devices?{API}", headers={"Authorization": tok})
            return st == 401
        finally:
            c.close()

    def rest_expired_token(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "GET", f"/devices?{API}",
                            headers={"Authorization": self.hub.token(expiry=-60)})
            return st == 401
        finally:
            c.close()

    def rest_garbage_token(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "GET", f"/devices?{API}",
                            headers={"Authorization": "SharedAccessSignature " + "%%" * 50})
            return st == 401
        finally:
            c.close()

    def rest_bad_json(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "PUT", f"/devices/bad-json?{API}", body=b"{not json",
                            headers={"Authorization": self.hub.token()})
            return st == 400
        finally:
            c.close()

    def rest_bad_c2d(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "POST", f"/devices/soak-c2d-0/messages/deviceBound?{API}",
                            body=os.urandom(64), headers={"Authorization": self.hub.token()})
            return 400 <= st < 500
        finally:
            c.close()

    def rest_unknown_path(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "GET", f"/no/such/{random.randint(0, 99)}?{API}",
                            headers={"Authorization": self.hub.token()})
            return st == 404
        finally:
            c.close()

    def rest_bad_api_version(self):
        c = self.hub.https(10)
        try:
            st, _ = request(c, "GET", "/devices?api-version=1999-01-01",
                            headers={"Authorization": self.hub.token()})
            return 400 <= st < 500
        finally:
            c.close()

    def rest_garbage_http(self):
        s = self.tls(self.hub.https_port)
        try:
            s.sendall(b"GARBAGE \x00\x01\x02 HTTP/9.9\r\n" + os.urandom(200) + b"\r\n\r\n")
            s.settimeout(15)
            try:
                data = s.recv(100)
            except (OSError, ssl.SSLError):
                return True
            return not data or data.startswith(b"HTTP/1.1 4")
        finally:
            s.close()

    def rest_truncated_body(self):
        # Announces 1,000 body bytes, sends 10 and hangs up.
        s = self.tls(self.hub.https_port)
        try:
            head = (f"PUT /devices/trunc?{API} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: {self.hub.token()}\r\nContent-Type: application/json\r\n"
                    "Content-Length: 1000\r\n\r\n{\"deviceId\"")
            s.sendall(head.encode())
            time.sleep(0.05)
        finally:
            s.close()
        return True


ABUSES = [
    "mqtt_garbage_tcp", "https_garbage_tcp", "tls_truncated_hello", "tls_bad_record",
    "tls_old_version", "tls_untrusted_client_abort", "mqtt_tls_garbage", "connect_bad_password",
    "connect_unknown_device", "connect_bad_protocol", "connect_huge_length",
    "publish_before_connect", "half_connect_then_close", "rest_no_auth", "rest_bad_token",
    "rest_expired_token", "rest_garbage_token", "rest_bad_json", "rest_bad_c2d",
    "rest_unknown_path", "rest_bad_api_version", "rest_garbage_http", "rest_truncated_body",
]


def silent_holder(hub, stop, counts, lock):
    """Keeps a TLS connection open that never sends CONNECT; reopens it when the hub closes it
    (the hub must, within its 30 s connect timeout)."""
    ab = Abuser(hub)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            s = ab.tls(timeout=120)
            s.settimeout(120)
            try:
                data = s.recv(10)
            except (OSError, ssl.SSLError):
                data = b""
            s.close()
            waited = time.monotonic() - t0
            with lock:
                k = "silent_tls_closed_by_hub" if not data and waited < 60 else "silent_tls_unexpected"
                counts.setdefault(k, [0, 0])[0 if k.endswith("by_hub") else 1] += 1
        except (OSError, ssl.SSLError):
            time.sleep(1)


def cmd_abuse(a):
    hub = Hub(a.data_dir)
    out = IntervalLog(a.out)
    ab = Abuser(hub)
    counts = {}  # kind -> [expected, unexpected]
    silent = {}  # the same, filled by the attempts and the silent holders; merged at each interval
    lock = threading.Lock()
    stop = threading.Event()
    for _ in range(a.silent):
        threading.Thread(target=silent_holder, args=(hub, stop, silent, lock), daemon=True).start()
    def attempt(kind):
        try:
            good = getattr(ab, kind)()
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            # A refused or reset connection is the hub saying no; anything else is noted.
            good = isinstance(e, (ConnectionError, ssl.SSLError))
            if not good:
                kind = f"{kind}:{type(e).__name__}"
        with lock:
            c = silent.setdefault(kind, [0, 0])
            c[0 if good else 1] += 1

    # Attempts run on a pool, so the few the hub rightly keeps until its timeouts do not hold
    # back the rest.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=32)
    period = 1.0 / a.rate
    nxt = time.monotonic()
    last_emit = time.monotonic()
    i = 0
    while True:
        now = time.monotonic()
        if now < nxt:
            time.sleep(nxt - now)
        nxt = max(nxt + period, time.monotonic() - 1)
        pool.submit(attempt, ABUSES[i % len(ABUSES)])
        i += 1
        if time.monotonic() - last_emit >= a.interval:
            with lock:
                for k, (good, bad) in silent.items():
                    c = counts.setdefault(k, [0, 0])
                    c[0] += good
                    c[1] += bad
                silent.clear()
            out.write({"counts": counts})
            counts = {}
            last_emit = time.monotonic()


# ---------------------------------------------------------------------------------------------
# sample


LOOPS = {
    # name: (RESULT latency key path, op count key)
    "telemetry": (("latency_ms",), "acked_total"),
    "c2d": (("latency_ms", "delivery"), "succeeded"),
    "methods": (("latency_ms", "round_trip"), "succeeded"),
    "twin": (("latency_ms", "patch"), "succeeded"),
    "connect": (("latency_ms",), "connected"),
}


def dig(obj, path):
    for k in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


class Tail:
    """Reads the lines appended to a file since the last call."""

    def __init__(self, path):
        self.path, self.pos, self.partial = path, 0, b""

    def new_lines(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [l.decode(errors="replace") for l in lines]


def proc_figures(pid):
    st = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            st[k] = v.strip()
    rss = int(st["VmRSS"].split()[0])
    anon = int(st.get("RssAnon", "0 kB").split()[0])
    file_ = int(st.get("RssFile", "0 kB").split()[0])
    threads = int(st["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    return rss, fds, threads, cpu, anon, file_


COLUMNS = (
    ["elapsed_s", "rss_kib", "fds", "threads", "server_cpu_s"]
    + [f"{k}_{p}_ms" for k in ["telemetry", "c2d", "methods", "twin", "desired"] for p in ["p50", "p99"]]
    + [f"{k}_ops" for k in ["telemetry", "c2d", "methods", "twin", "desired", "connect", "abuse"]]
    + ["load_failures", "load_runs_failed", "desired_errors", "abuse_unexpected", "log_warn", "log_error"]
    # VmRSS split: heap and other anonymous memory, and mapped files (the binary, SQLite's -shm).
    + ["rss_anon_kib", "rss_file_kib"]
)


def cmd_sample(a):
    out_dir = a.out_dir
    tails = {n: Tail(os.path.join(out_dir, "loops", f"{n}.out")) for n in LOOPS}
    fails = {n: Tail(os.path.join(out_dir, "loops", f"{n}.failed")) for n in LOOPS}
    desired = Tail(os.path.join(out_dir, "loops", "desired.jsonl"))
    abuse = Tail(os.path.join(out_dir, "loops", "abuse.jsonl"))
    log = Tail(os.path.join(out_dir, "ferrohub.log"))
    totals = {c: 0 for c in COLUMNS if c.endswith("_ops")}
    errs = {"load_failures": 0, "load_runs_failed": 0, "desired_errors": 0,
            "abuse_unexpected": 0, "log_warn": 0, "log_error": 0}
    # Whole-run detail for the summary: failure kinds, abuse kinds, log messages.
    detail = {"load_failure_kinds": {}, "abuse": {}, "desired_error_kinds": {},
              "log_messages": {}, "runs": {n: 0 for n in LOOPS}}
    new = not os.path.exists(a.csv)
    f = open(a.csv, "a", newline="", buffering=1)
    w = csv.writer(f)
    if new:
        w.writerow(COLUMNS)
    t0 = time.time()
    next_t = t0
    while True:
        next_t += a.interval
        time.sleep(max(0, next_t - time.time()))
        try:
            rss, fds, threads, cpu, anon, file_ = proc_figures(a.pid)
        except (FileNotFoundError, ProcessLookupError, KeyError):
            print("sample: the server process is gone", file=sys.stderr)
            sys.exit(3)
        row = {"elapsed_s": round(time.time() - t0, 1), "rss_kib": rss, "fds": fds,
               "threads": threads, "server_cpu_s": round(cpu, 2), "rss_anon_kib": anon,
               "rss_file_kib": file_}
        for n, (lat_path, op_key) in LOOPS.items():
            p50s, p99s = [], []
            for line in tails[n].new_lines():
                if not line.startswith("RESULT "):
                    continue
                try:
                    r = json.loads(line[7:])
                except ValueError:
                    continue
                detail["runs"][n] += 1
                totals[f"{n}_ops"] += int(r.get(op_key) or 0)
                lat = dig(r, lat_path) or {}
                if lat.get("p50") is not None and n != "connect":
                    p50s.append(lat["p50"])
                    p99s.append(lat["p99"])
                failed = int(r.get("failed") or 0) + int(r.get("connection_errors") or 0)
                errs["load_failures"] += failed
                for k, v in (r.get("failures") or {}).items():
                    key = f"{n}: {k}"
                    detail["load_failure_kinds"][key] = detail["load_failure_kinds"].get(key, 0) + int(v)
            if n != "connect":
                row[f"{n}_p50_ms"] = round(statistics.median(p50s), 3) if p50s else ""
                row[f"{n}_p99_ms"] = round(max(p99s), 3) if p99s else ""
            for line in fails[n].new_lines():
                if line.strip():
                    errs["load_runs_failed"] += 1
                    key = f"{n}: run failed: {line.split(' ', 1)[-1][:160]}"
                    detail["load_failure_kinds"][key] = detail["load_failure_kinds"].get(key, 0) + 1
        p50s, p99s = [], []
        for line in desired.new_lines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            totals["desired_ops"] += d["ok"]
            errs["desired_errors"] += d["err"]
            for k, v in d.get("errors", {}).items():
                detail["desired_error_kinds"][k] = detail["desired_error_kinds"].get(k, 0) + v
            if d.get("p50") is not None:
                p50s.append(d["p50"])
                p99s.append(d["p99"])
        row["desired_p50_ms"] = round(statistics.median(p50s), 3) if p50s else ""
        row["desired_p99_ms"] = round(max(p99s), 3) if p99s else ""
        for line in abuse.new_lines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            for k, (good, bad) in d["counts"].items():
                totals["abuse_ops"] += good + bad
                errs["abuse_unexpected"] += bad
                e = detail["abuse"].setdefault(k, [0, 0])
                e[0] += good
                e[1] += bad
        for line in log.new_lines():
            m = re.search(r"\b(WARN|ERROR)\b\s+(\S+?):?\s+(.*)", line)
            if not m:
                continue
            errs["log_warn" if m.group(1) == "WARN" else "log_error"] += 1
            # The message without its variable fields, to group similar lines.
            msg = re.sub(r"\x1b\[[0-9;]*m", "", m.group(3))
            msg = re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "N", msg)[:140]
            key = f"{m.group(1)} {m.group(2)} {msg}"
            detail["log_messages"][key] = detail["log_messages"].get(key, 0) + 1
        row.update(totals)
        row.update(errs)
        w.writerow([row.get(c, "") for c in COLUMNS])
        f.flush()
        tmp = a.detail + ".tmp"
        with open(tmp, "w") as df:
            json.dump(detail, df, indent=1, sort_keys=True)
        os.replace(tmp, a.detail)
        if time.time() >= a.until:
            return


# ---------------------------------------------------------------------------------------------
# report


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
    return out


def cmd_report(a):
    rows = read_csv(a.csv)
    if len(rows) < 4:
        print(f"report: only {len(rows)} samples, too few to judge", file=sys.stderr)
        sys.exit(1)
    duration = rows[-1]["elapsed_s"]
    warm = [r for r in rows if r["elapsed_s"] >= a.warmup] or rows
    q = max(1, len(warm) // 4)
    quarters = [warm[i * q:(i + 1) * q] for i in range(3)] + [warm[3 * q:]]
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    rss_q = [med(qs, "rss_kib") for qs in quarters]
    fd_floor = [min(r["fds"] for r in qs) for qs in quarters]
    fd_med = [med(qs, "fds") for qs in quarters]
    last = rows[-1]
    lat = {}
    for k in ["telemetry", "c2d", "methods", "twin", "desired"]:
        p50 = [r[f"{k}_p50_ms"] for r in rows if r[f"{k}_p50_ms"] is not None]
        p99 = [r[f"{k}_p99_ms"] for r in rows if r[f"{k}_p99_ms"] is not None]
        if p50:
            lat[k] = {"p50_median": round(statistics.median(p50), 3),
                      "p99_median": round(statistics.median(p99), 3),
                      "p99_worst": round(max(p99), 3),
                      "p99_first_quarter": round(statistics.median(p99[: max(1, len(p99) // 4)]), 3),
                      "p99_last_quarter": round(statistics.median(p99[-max(1, len(p99) // 4):]), 3)}
    rss_growth_kib = rss_q[3] - rss_q[0]
    rss_fail = rss_growth_kib > 0.20 * rss_q[0] and rss_growth_kib > 20 * 1024
    fd_steady = all(fd_floor[i] < fd_floor[i + 1] for i in range(3))
    fd_fail = fd_steady and fd_floor[3] - fd_floor[0] > max(20, 0.1 * fd_floor[0])
    summary = {
        "duration_s": duration,
        "samples": len(rows),
        "warmup_s": a.warmup,
        "rss_kib": {"start": warm[0]["rss_kib"], "end": last["rss_kib"],
                    "max": max(r["rss_kib"] for r in rows),
                    "quarter_medians": rss_q, "growth_first_to_last_quarter_kib": rss_growth_kib},
        "fds": {"start": warm[0]["fds"], "end": last["fds"], "max": max(r["fds"] for r in rows),
                "quarter_floors": fd_floor, "quarter_medians": fd_med},
        "threads": {"start": warm[0]["threads"], "end": last["threads"],
                    "max": max(r["threads"] for r in rows)},
        "server_cpu_s": last["server_cpu_s"],
        "server_cores_avg": round(last["server_cpu_s"] / duration, 3) if duration else None,
        "ops": {k[:-4]: int(last[k]) for k in last if k.endswith("_ops")},
        "errors": {k: int(last[k]) for k in ["load_failures", "load_runs_failed", "desired_errors",
                                             "abuse_unexpected", "log_warn", "log_error"]},
        "latency_ms": lat,
        "checks": {"rss_growth_ok": not rss_fail, "fd_growth_ok": not fd_fail},
    }
    with open(a.summary, "w") as f:
        json.dump(summary, f, indent=1)
    if a.png or a.svg:
        plot(rows, a)
    print(json.dumps(summary, indent=1))
    sys.exit(1 if (rss_fail or fd_fail) else 0)


def plot(rows, a):
    t = [r["elapsed_s"] / 60 for r in rows]
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
        ax[0].plot(t, [r["rss_kib"] / 1024 for r in rows], color="tab:blue")
        ax[0].set_ylabel("server RSS (MiB)")
        ax[0].set_ylim(bottom=0)
        ax0b = ax[0].twinx()
        ax0b.plot(t, [r["threads"] for r in rows], color="tab:gray", lw=0.8)
        ax0b.set_ylabel("threads", color="tab:gray")
        ax0b.set_ylim(bottom=0)
        ax[1].plot(t, [r["fds"] for r in rows], color="tab:green", lw=0.8)
        ax[1].set_ylabel("open fds")
        ax[1].set_ylim(bottom=0)
        for k, c in [("telemetry", "tab:blue"), ("c2d", "tab:orange"), ("methods", "tab:green"),
                     ("twin", "tab:red"), ("desired", "tab:purple")]:
            pts = [(tt, r[f"{k}_p99_ms"]) for tt, r in zip(t, rows) if r[f"{k}_p99_ms"] is not None]
            if pts:
                ax[2].plot([p[0] for p in pts], [p[1] for p in pts], ".-", ms=3, lw=0.6,
                           color=c, label=f"{k} p99")
        ax[2].set_yscale("log")
        ax[2].set_ylabel("latency p99 (ms)")
        ax[2].set_xlabel("minutes")
        ax[2].legend(fontsize=7, ncol=5, loc="upper left")
        fig.suptitle(a.title, fontsize=10)
        fig.tight_layout()
        fig.savefig(a.png, dpi=80)
    if a.svg:
        write_svg(rows, t, a.svg, a.title)


def write_svg(rows, t, path, title):
    """A dependency-free fallback: RSS and fds as two polylines."""
    W, H, P = 900, 500, 50
    tmax = max(t) or 1

    def poly(vals, y0, h, color):
        vmax = max(vals) or 1
        pts = " ".join(f"{P + tt / tmax * (W - 2 * P):.1f},{y0 + h - v / vmax * h:.1f}"
                       for tt, v in zip(t, vals))
        return (f'<polyline fill="none" stroke="{color}" points="{pts}"/>'
                f'<text x="{P}" y="{y0 - 5}" font-size="12">max {vmax:.0f}</text>')

    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">',
            f'<text x="{P}" y="20" font-size="14">{title}</text>',
            poly([r["rss_kib"] / 1024 for r in rows], 50, 180, "blue"),
            f'<text x="{W - 200}" y="45" font-size="12" fill="blue">RSS MiB</text>',
            poly([r["fds"] for r in rows], 280, 180, "green"),
            f'<text x="{W - 200}" y="275" font-size="12" fill="green">open fds</text>',
            "</svg>"]
    with open(path, "w") as f:
        f.write("\n".join(body))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("desired")
    d.add_argument("data_dir")
    d.add_argument("out")
    d.add_argument("--devices", type=int, default=20)
    d.add_argument("--rate", type=float, default=20)
    d.add_argument("--prefix", default="soak-des-")
    d.add_argument("--interval", type=float, default=10)
    b = sub.add_parser("abuse")
    b.add_argument("data_dir")
    b.add_argument("out")
    b.add_argument("--rate", type=float, default=5)
    b.add_argument("--silent", type=int, default=4, help="TLS connections that never CONNECT")
    b.add_argument("--interval", type=float, default=10)
    s = sub.add_parser("sample")
    s.add_argument("pid", type=int)
    s.add_argument("out_dir")
    s.add_argument("csv")
    s.add_argument("detail")
    s.add_argument("--interval", type=float, default=10)
    s.add_argument("--until", type=float, required=True)
    r = sub.add_parser("report")
    r.add_argument("csv")
    r.add_argument("summary")
    r.add_argument("--png")
    r.add_argument("--svg")
    r.add_argument("--warmup", type=float, default=60)
    r.add_argument("--title", default="Ferrohub soak")
    a = p.parse_args()
    {"desired": cmd_desired, "abuse": cmd_abuse, "sample": cmd_sample, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
