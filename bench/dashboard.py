"""The dashboard: navigation to the first rendered model row, and the page's transfer size,
on a node with 20 catalogue models (4 loaded), in headless Chromium; side by side with a
plain `GET /models` of the same node.

A real `neuronctl start` whose workers are the fake llama-server (tests/fake_llama_server.py).
Each navigation starts with the browser's cache cleared; the first row is the page's own
`neuron:first-row` performance mark (set when the table first has a row, i.e. after the
event stream's snapshot arrived). Sizes are response bodies, gzipped as served to a browser
and decoded, for the page and its two assets (the event stream is not counted: it stays
open).

    .venv/bin/python bench/dashboard.py [--rounds 10]

Needs Debian's chromium and chromium-driver (.ci/browser.sh) and selenium (the test extra).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import poll_until, start_daemon, write_tiny_gguf

N_MODELS = 20
N_LOADED = 4


def catalogue(gguf: Path) -> str:
    tables = []
    for i in range(N_MODELS):
        kind = "default_models" if i < N_LOADED else "models"
        tables.append(f'[[{kind}]]\nmodel_id = "org/model-{i:02d}"\n'
                      f'harness = "llama-server"\npath = "{gguf}"\n')
    return "\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        sys.exit("dashboard bench: needs selenium (pip install -e '.[test]')")
    if chromium is None or driver_path is None:
        sys.exit("dashboard bench: needs chromium and chromedriver (.ci/browser.sh)")

    with tempfile.TemporaryDirectory(prefix="neuron-bench-dash-") as tmp:
        work = Path(tmp)
        daemon = start_daemon(work / "node", catalogue(write_tiny_gguf(work / "tiny.gguf")))
        options = Options()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--disable-gpu", "--no-first-run", f"--user-data-dir={work / 'profile'}"):
            options.add_argument(arg)
        browser = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
            last = f"org/model-{N_LOADED - 1:02d}"
            poll_until(lambda: daemon.model(last)["status"] == "loaded", 30)
            first_row: list[float] = []
            sizes: list[tuple[int, int]] = []
            for _ in range(args.rounds):
                browser.execute_cdp_cmd("Network.clearBrowserCache", {})
                browser.get(daemon.url + "/")
                mark = poll_until(lambda: browser.execute_script(
                    "const m = performance.getEntriesByName('neuron:first-row');"
                    "return m.length ? m[0].startTime : null"), 10)
                first_row.append(float(mark))
                sizes = browser.execute_script("""
                    const nav = performance.getEntriesByType('navigation')[0];
                    return [nav, ...performance.getEntriesByType('resource')
                        .filter(r => r.name.includes('/ui/'))]
                        .map(e => [e.encodedBodySize, e.decodedBodySize]);""")
            listing: list[float] = []
            body = b""
            for _ in range(args.rounds):
                started = time.perf_counter()
                with urllib.request.urlopen(daemon.url + "/models") as answer:
                    body = answer.read()
                listing.append((time.perf_counter() - started) * 1000)
        finally:
            browser.quit()
            daemon.stop()

    gzipped, plain = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
    print(f"dashboard, {N_MODELS} models ({N_LOADED} loaded), {args.rounds} rounds, "
          "cache cleared each time")
    print(f"  {'':34} {'median':>8} {'max':>8}")
    print(f"  {'navigation -> first model row':34} {statistics.median(first_row):6.0f}ms "
          f"{max(first_row):6.0f}ms")
    print(f"  {'GET /models (urllib, for scale)':34} {statistics.median(listing):6.1f}ms "
          f"{max(listing):6.1f}ms")
    print(f"  page transfer: {gzipped} bytes gzipped, {plain} bytes decoded, in {len(sizes)} "
          f"files (index.html, app.js, app.css); GET /models body: {len(body)} bytes")


if __name__ == "__main__":
    main()
