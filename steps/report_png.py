"""Render an HTML page in headless Chromium to a full-page PNG (for report.html: `make report-png`).

    python steps/report_png.py data/runs/smol-cpu/report.html data/runs/smol-cpu/report.png --width 1200

Drives Debian's chromium through chromium-driver (chromedriver) with the plain W3C WebDriver protocol over HTTP, so
no Python package is needed: it loads the page, measures its height and sizes the window to it before the
screenshot. Needs `apt-get install chromium chromium-driver`. The page itself makes no requests (plots are data URIs).
"""

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from common import SetupError, run_step
from common.io.files import atomic_path, output_lock
from common.options import positive_int, step_parser


def parse_args(argv=None):
    p = step_parser(__doc__)
    p.add_argument("page", type=Path, help="HTML file")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--width", type=positive_int, default=1200, help="window width in CSS pixels")
    p.add_argument("--max-height", type=positive_int, default=16000, help="cap on the page height captured")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return p.parse_args(argv)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}").get("value")


def wait_ready(base, driver, deadline=20):
    start = time.time()
    while time.time() - start < deadline:
        if driver.poll() is not None:
            raise SetupError(f"chromedriver exited with status {driver.returncode}; run `chromedriver --version` to "
                             "see why (chromium and chromium-driver must be the same version)")
        try:
            if call(base, "GET", "/status").get("ready"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SetupError(f"chromedriver did not answer within {deadline} s")


def main(argv=None):
    args = parse_args(argv)
    for tool in (args.chromium, args.chromedriver):
        if not Path(tool).exists():
            raise SetupError(f"{tool} not found: install it with `apt-get install -y chromium chromium-driver`")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    driver = subprocess.Popen([args.chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, driver)
        options = {"binary": args.chromium, "args": ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                                     f"--window-size={args.width},1000"]}
        session = call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})["sessionId"]
        try:
            call(base, "POST", f"/session/{session}/url", {"url": args.page.resolve().as_uri()})
            height = call(base, "POST", f"/session/{session}/execute/sync", {
                "script": "return Math.ceil(document.documentElement.scrollHeight)", "args": []})
            height = min(int(height), args.max_height)
            call(base, "POST", f"/session/{session}/window/rect", {"width": args.width, "height": height})
            # The viewport can come out a little smaller than the window: grow the window by the difference.
            inner = call(base, "POST", f"/session/{session}/execute/sync", {"script": "return window.innerHeight",
                                                                            "args": []})
            if inner < height:
                call(base, "POST", f"/session/{session}/window/rect",
                     {"width": args.width, "height": 2 * height - inner})
            data = base64.b64decode(call(base, "GET", f"/session/{session}/screenshot"))
        finally:
            call(base, "DELETE", f"/session/{session}")
    finally:
        driver.terminate()
        driver.wait(timeout=10)
    with output_lock(args.out), atomic_path(args.out) as tmp:
        tmp.write_bytes(data)
    print(f"wrote {args.out} ({args.width} x {height} CSS pixels)")


if __name__ == "__main__":
    run_step(main)
