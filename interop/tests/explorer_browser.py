"""A headless Chromium (Debian's chromium + chromium-driver) driven by Selenium for the web
explorer tests, trusting the hub's CA through an NSS database in a temporary HOME.

TLS trust: Chromium on Linux reads its certificate store from $HOME/.pki/nssdb. With certutil
(Debian libnss3-tools) the hub's development CA is added there as a trusted CA ("C,,"), so the
page is verified like any site with a private CA. Without certutil the browser falls back to
--ignore-certificate-errors-spki-list with the SHA-256 of the server certificate's public key
(still pinned to this hub's key, not "ignore all errors"). `Browser.trust` says which was used.
"""

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
WIDTH, HEIGHT = 1280, 800


def find_binary(candidates, name):
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    return shutil.which(name)


def spki_sha256(cert_pem_path: str) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo DER)) of a PEM certificate, via openssl."""
    pub = subprocess.run(["openssl", "x509", "-in", cert_pem_path, "-noout", "-pubkey"],
                         check=True, capture_output=True, timeout=20).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub,
                         check=True, capture_output=True, timeout=20).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Browser:
    """One Chromium for a test module: .driver, .trust ('nss' or 'spki'), .close()."""

    def __init__(self, ca_file: str, server_cert: str = None):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium = find_binary(CHROMIUM_CANDIDATES, "chromium")
        driver_bin = find_binary(DRIVER_CANDIDATES, "chromedriver")
        if not chromium or not driver_bin:
            raise RuntimeError("chromium and chromium-driver are needed (apt-get install chromium "
                               "chromium-driver; scripts/test.sh installs them)")
        self.tmp = Path(tempfile.mkdtemp(prefix="ferrohub-explorer-browser-"))
        home = self.tmp / "home"
        profile = self.tmp / "profile"
        home.mkdir()
        profile.mkdir()
        self.profile = str(profile)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERROHUB_")}
        env["HOME"] = str(home)
        env.pop("DISPLAY", None)

        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--no-default-browser-check", "--disable-extensions", "--password-store=basic",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-features=Translate,MediaRouter,OptimizationHints",
                  "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}",
                  "--lang=en-GB"):
            opts.add_argument(a)
        if os.geteuid() == 0:
            opts.add_argument("--no-sandbox")

        certutil = shutil.which("certutil")
        if certutil:
            nssdb = home / ".pki" / "nssdb"
            nssdb.mkdir(parents=True)
            subprocess.run([certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True,
                           capture_output=True, timeout=30, env=env)
            subprocess.run([certutil, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "ferrohub",
                            "-i", ca_file], check=True, capture_output=True, timeout=30, env=env)
            self.trust = "nss"
        else:
            cert = server_cert or ca_file
            opts.add_argument(f"--ignore-certificate-errors-spki-list={spki_sha256(cert)}")
            self.trust = "spki"
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})

        self.service = Service(executable_path=driver_bin, env=env,
                               log_output=str(self.tmp / "chromedriver.log"))
        self.driver = webdriver.Chrome(service=self.service, options=opts)
        self.driver.set_page_load_timeout(30)
        # A fixed 1280x800 viewport, whatever the headless window's frame.
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                                     "mobile": False})
        self.console = []

    def logs(self):
        """Console messages since the last call (kept in .console too)."""
        try:
            new = self.driver.get_log("browser")
        except Exception:  # noqa: BLE001 - the browser may be gone
            new = []
        self.console.extend(new)
        return new

    def _leftover_pids(self):
        """Processes still running with this browser's profile directory on their command line."""
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if self.profile.encode() in cmd:
                pids.append(int(p.name))
        return pids

    def close(self):
        try:
            self.driver.quit()
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        proc = getattr(self.service, "process", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        # Nothing of this browser may outlive the tests: end what still runs with our profile.
        deadline = time.monotonic() + 5
        while self._leftover_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
