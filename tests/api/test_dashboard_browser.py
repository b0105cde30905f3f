"""The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium) against a real daemon whose workers are the fake llama-server: the page
shows the node's models and follows them live, loads and unloads, shows errors inline,
follows a log, asks for the key when one is set, and breaks no Content-Security-Policy.

Screenshots (1280x800 and a phone's width, light and dark) and the measurements (time to
the first model row, the page's transfer size, with 20 models) are written to
.cache/test-artifacts/dashboard/. Skipped, with the reason, where the browser is missing
(.ci/browser.sh installs it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..helpers import Daemon, poll_until, start_daemon

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (.ci/browser.sh installs them)")

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".cache" / "test-artifacts" / "dashboard"
KEY = "dashboard-test-key"
READ_KEY = "dashboard-read-key"  # a [[keys]] entry with the read role only
DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
N_MODELS = 20


def model(model_id: str, gguf: Path, *, default: bool = False, **extra: Any) -> str:
    table = "[[default_models]]" if default else "[[models]]"
    lines = [table, f'model_id = "{model_id}"', 'harness = "llama-server"', f'path = "{gguf}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Daemon]:
    """20 catalogue models: two loaded at start, one whose worker refuses its arguments
    (with HTML in its reason), the rest unloaded."""
    models = model("alpha", tiny_gguf, default=True, pinned=True)
    models += model("org/gamma-7b", tiny_gguf, default=True, ttl_s=600)
    models += model("beta", tiny_gguf)
    models += model("broken", tiny_gguf, args=["--fake-load-s", "<b>soon</b>"])
    for i in range(N_MODELS - 4):
        models += model(f"catalogue/model-{i:02d}", tiny_gguf)
    daemon = start_daemon(tmp_path_factory.mktemp("dash"), models)
    try:
        poll_until(lambda: daemon.model("org/gamma-7b")["status"] == "loaded", 20)
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = Options()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--password-store=basic", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile / "driver.log"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        pytest.skip(f"chromium does not start here: {exc.msg}")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)  # the viewport
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: WebDriver, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def row_of(driver: WebDriver, model_id: str) -> WebElement | None:
    found: WebElement | None = js(
        driver, "return [...document.querySelectorAll('#rows tr.model')]"
        ".find(r => r.dataset.modelId === arguments[0]) || null", model_id)
    return found


def status_of(driver: WebDriver, model_id: str) -> str | None:
    row = row_of(driver, model_id)
    return row.find_element(By.CSS_SELECTOR, ".status").text if row is not None else None


def detail_of(driver: WebDriver, model_id: str) -> str:
    text: str = js(driver, "const d = [...document.querySelectorAll('#rows tr.detail')]"
                           ".find(r => r.dataset.detailFor === arguments[0]);"
                           "return d && !d.hidden ? d.textContent : ''", model_id)
    return text


def button(driver: WebDriver, model_id: str, label: str) -> WebElement:
    row = row_of(driver, model_id)
    assert row is not None, f"no row for {model_id}"
    return next(b for b in row.find_elements(By.TAG_NAME, "button")
                if b.get_attribute("textContent") == label)  # .text is "" while hidden


def screenshot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


@contextlib.contextmanager
def emulated(driver: WebDriver, *, dark: bool = False, phone: bool = False) -> Iterator[None]:
    scheme = "dark" if dark else "light"
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": scheme}]})
    if phone:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        if phone:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url + "/")
    poll_until(lambda: row_of(driver, "alpha") is not None, 10)


def csp_violations(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


# --- the page ----------------------------------------------------------------------------------


def test_the_page_shows_the_loaded_models_and_is_quick(node: Daemon, browser: WebDriver) -> None:
    first_rows: list[float] = []
    for attempt in range(3):  # the median of three fresh navigations
        browser.execute_cdp_cmd("Network.clearBrowserCache", {})
        open_page(browser, node.url)
        first = js(browser, "const m = performance.getEntriesByName('neuron:first-row');"
                            "return m.length ? m[0].startTime : null")
        assert first is not None, "the page set no first-row mark"
        first_rows.append(first)
        if attempt == 0:
            entries = js(browser, """
                const nav = performance.getEntriesByType('navigation')[0];
                const res = performance.getEntriesByType('resource')
                    .filter(r => r.name.includes('/ui/'));
                return [nav, ...res].map(e => ({name: e.name, transfer: e.transferSize,
                    encoded: e.encodedBodySize, decoded: e.decodedBodySize}));""")
    poll_until(lambda: status_of(browser, "alpha") == "loaded", 5)
    assert status_of(browser, "org/gamma-7b") == "loaded"
    assert status_of(browser, "beta") == "unloaded"
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows tr.model")
    assert len(rows) == N_MODELS
    alpha = row_of(browser, "alpha")
    assert alpha is not None
    cells = [td.text for td in alpha.find_elements(By.TAG_NAME, "td")]
    assert cells[2] == "CPU" and cells[8] == "pinned" and cells[4] == "\u2013", cells
    assert cells[5].endswith("s")  # uptime
    gamma = row_of(browser, "org/gamma-7b")
    # Its TTL counting down, worded as `neuronctl status` words it (`in 10m`, not `9m59s`).
    assert gamma is not None and re.search(r"\bin (10|9)m\b", gamma.text), gamma.text
    assert "live" in browser.find_element(By.ID, "conn").text
    assert browser.find_element(By.ID, "login").is_displayed() is False
    screenshot(browser, "desktop-light")
    median = statistics.median(first_rows)
    gzip = sum(e["encoded"] for e in entries)
    plain = sum(e["decoded"] for e in entries)
    measured = {"models": len(rows), "first_row_ms": [round(v, 1) for v in first_rows],
                "first_row_ms_median": round(median, 1), "transfer_bytes": sum(
                    e["transfer"] for e in entries), "body_bytes_gzip": gzip,
                "body_bytes_plain": plain, "assets": entries}
    (ARTIFACTS / "measure.json").write_text(json.dumps(measured, indent=2))
    print(f"\nfirst row after {median:.0f} ms (median of 3); page {gzip} bytes gzipped "
          f"({plain} plain) in {len(entries)} files, {len(rows)} models")
    assert median < 1000, measured


def test_a_load_and_an_unload_through_the_api_show_within_a_second(
    node: Daemon, browser: WebDriver,
) -> None:
    open_page(browser, node.url)
    status, answer = node.request("POST", "/models/load", {"model_id": "beta"})
    assert status == 200, answer
    answered = time.monotonic()
    poll_until(lambda: status_of(browser, "beta") == "loaded", 1.0, interval=0.01)
    shown = time.monotonic() - answered
    # The details follow from one GET /models after the events.
    poll_until(lambda: (row := row_of(browser, "beta")) is not None
               and "CPU" in row.text and "MiB" in row.text, 2)
    status, answer = node.request("POST", "/models/unload", {"model_id": "beta"})
    assert status == 200, answer
    answered = time.monotonic()
    poll_until(lambda: status_of(browser, "beta") == "unloaded", 1.0, interval=0.01)
    print(f"\nload shown {shown * 1000:.0f} ms after the API answered, unload "
          f"{(time.monotonic() - answered) * 1000:.0f} ms")


def test_a_load_and_an_unload_from_the_page(node: Daemon, browser: WebDriver) -> None:
    open_page(browser, node.url)
    button(browser, "beta", "Load").click()
    poll_until(lambda: status_of(browser, "beta") == "loaded", 10)
    assert node.model("beta")["status"] == "loaded"
    poll_until(lambda: button(browser, "beta", "Unload").is_displayed(), 2)
    button(browser, "beta", "Unload").click()
    poll_until(lambda: status_of(browser, "beta") == "unloaded", 10)
    assert node.model("beta")["status"] == "unloaded"
    # By id, from the form (keyboard: type, Enter).
    field = browser.find_element(By.ID, "load-id")
    field.send_keys("beta\n")
    poll_until(lambda: status_of(browser, "beta") == "loaded", 10)
    assert browser.find_element(By.ID, "load-error").text == ""
    node.request("POST", "/models/unload", {"model_id": "beta"})
    poll_until(lambda: status_of(browser, "beta") == "unloaded", 5)


def test_errors_are_shown_inline_as_the_api_gives_them(node: Daemon, browser: WebDriver) -> None:
    open_page(browser, node.url)
    button(browser, "broken", "Load").click()
    poll_until(lambda: "load failed" in detail_of(browser, "broken"), 10)
    detail = detail_of(browser, "broken")
    # The worker's own reason, HTML in it shown as text.
    assert "invalid float value: '<b>soon</b>'" in detail, detail
    assert status_of(browser, "broken") == "failed"
    poll_until(lambda: not button(browser, "broken", "Unload").is_displayed(), 2)
    assert js(browser, "return document.querySelectorAll('#rows b').length") == 0
    # The form: the same error the API answers.
    status, answer = node.request("POST", "/models/load", {"model_id": "no such model!"})
    assert status >= 400
    field = browser.find_element(By.ID, "load-id")
    field.clear()
    field.send_keys("no such model!\n")
    poll_until(lambda: browser.find_element(By.ID, "load-error").text, 10)
    shown = browser.find_element(By.ID, "load-error").text
    assert shown == f"load no such model!: {answer['error']}", shown
    # Reloaded, the failed model still says why (from the snapshot).
    open_page(browser, node.url)
    poll_until(lambda: "invalid float value" in detail_of(browser, "broken"), 5)
    assert detail_of(browser, "broken").startswith("error: ")


def test_the_log_view_follows_new_lines(node: Daemon, browser: WebDriver) -> None:
    open_page(browser, node.url)
    row = row_of(browser, "alpha")
    assert row is not None
    row.find_element(By.CSS_SELECTOR, "button.model-name").click()
    text = browser.find_element(By.ID, "log-text")
    poll_until(lambda: "fake llama-server pid" in text.text, 5)
    assert browser.find_element(By.ID, "log-state").text == "following"
    log_path = Path(node.model("alpha")["log_path"])
    hostile = "<img src=x onerror=window.__xss=1> appended by the test"
    with log_path.open("a") as fh:
        fh.write(hostile + "\n")
    started = time.monotonic()
    poll_until(lambda: hostile in text.text, 3, interval=0.02)
    print(f"\na new log line shown after {(time.monotonic() - started) * 1000:.0f} ms")
    assert js(browser, "return document.querySelectorAll('#log-text *').length") == 0
    assert js(browser, "return window.__xss === undefined")
    # Traffic for the charts while the log is open: requests/s and tokens/s from the counters.
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 16}).encode()
            request = urllib.request.Request(node.url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
            stop.wait(0.1)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        rates = lambda: row_of(browser, "alpha").find_element(  # noqa: E731
            By.CSS_SELECTOR, ".rates").text  # type: ignore[union-attr]
        poll_until(lambda: rates().split(" req/s")[0] not in ("", "0.0"), 10)
        poll_until(lambda: "0.0 tok/s" not in rates(), 5)
        poll_until(lambda: js(browser, "return +document.querySelector("
                                       "'#rows tr.model canvas').dataset.points") >= 4, 12)
        assert log_path.read_text().count("POST /v1/completions 200") > 0
        screenshot(browser, "desktop-light-log")
        with emulated(browser, dark=True):
            screenshot(browser, "desktop-dark-log")
        with emulated(browser, phone=True):
            browser.execute_script("window.scrollTo(0, 0)")
            screenshot(browser, "phone-light")
        with emulated(browser, phone=True, dark=True):
            screenshot(browser, "phone-dark")
    finally:
        stop.set()
        sender.join(15)
    # Escape closes it.
    text.send_keys("\ue00c")
    poll_until(lambda: not browser.find_element(By.ID, "logs").is_displayed(), 2)


def test_the_page_breaks_no_content_security_policy(node: Daemon, browser: WebDriver) -> None:
    open_page(browser, node.url)
    assert csp_violations(browser) == []


# --- with an API key -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Daemon]:
    monitor = (f'[[keys]]\nname = "monitor"\nroles = ["read"]\n'
               f'sha256 = "{hashlib.sha256(READ_KEY.encode()).hexdigest()}"\n')
    daemon = start_daemon(tmp_path_factory.mktemp("dash-key"),
                          model("alpha", tiny_gguf, default=True), api_key=KEY,
                          settings=monitor)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_with_a_key_the_page_asks_for_it_and_keeps_it_in_the_tab(
    keyed: Daemon, browser: WebDriver,
) -> None:
    browser.get(keyed.url + "/")
    login = browser.find_element(By.ID, "login")
    poll_until(login.is_displayed, 5)
    assert not browser.find_element(By.ID, "dash").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#rows tr") == []
    assert "alpha" not in browser.page_source
    field = browser.find_element(By.ID, "key")
    assert js(browser, "return document.activeElement.id") == "key"
    with emulated(browser, dark=True):
        screenshot(browser, "login-dark")
    field.send_keys("wrong key\n")
    poll_until(lambda: "refused" in browser.find_element(By.ID, "login-error").text, 5)
    field.send_keys(KEY + "\n")
    poll_until(lambda: status_of(browser, "alpha") == "loaded", 5)
    assert not login.is_displayed()
    assert js(browser, "return sessionStorage.getItem('neuron.apiKey')") == KEY
    assert js(browser, "return localStorage.length") == 0
    assert KEY not in browser.current_url
    # A reload of the tab keeps it; the log (fetch with the header) works with it.
    browser.refresh()
    poll_until(lambda: status_of(browser, "alpha") == "loaded", 5)
    row = row_of(browser, "alpha")
    assert row is not None
    row.find_element(By.CSS_SELECTOR, "button.model-name").click()
    poll_until(lambda: "fake llama-server pid" in browser.find_element(By.ID, "log-text").text, 5)
    browser.find_element(By.ID, "forget").click()
    poll_until(browser.find_element(By.ID, "login").is_displayed, 5)
    assert js(browser, "return sessionStorage.getItem('neuron.apiKey')") is None
    assert csp_violations(browser) == []


def test_the_field_refuses_a_typo_and_a_failed_ad_hoc_row_can_be_removed(
    node: Daemon, browser: WebDriver, tmp_path: Path, tiny_gguf: Path
) -> None:
    open_page(browser, node.url)
    field = browser.find_element(By.ID, "load-id")
    field.clear()
    field.send_keys("betaa\n")
    poll_until(lambda: browser.find_element(By.ID, "load-error").text, 10)
    assert browser.find_element(By.ID, "load-error").text == (
        "load betaa: no model 'betaa' in the catalogue (did you mean beta?); to fetch a "
        "Hugging Face repo give --repo/--quant/--file")
    assert row_of(browser, "betaa") is None  # nothing was fetched, no row left behind
    # A model of its own whose file goes away: failed at once, and removable.
    model_file = tmp_path / "adhoc.gguf"
    model_file.write_bytes(tiny_gguf.read_bytes())
    status, answer = node.request("POST", "/models/load", {
        "model_id": "adhoc", "harness": "llama-server", "path": str(model_file)})
    assert status == 200, answer
    model_file.unlink()
    os.kill(answer["model"]["pid"], signal.SIGKILL)
    poll_until(lambda: status_of(browser, "adhoc") == "failed", 15)
    assert "model file not found" in detail_of(browser, "adhoc")
    remove = button(browser, "adhoc", "Remove")
    poll_until(remove.is_displayed, 2)
    remove.click()
    poll_until(lambda: row_of(browser, "adhoc") is None, 10)


def test_an_error_is_shown_once_and_until_reads_as_in_the_cli(
    node: Daemon, browser: WebDriver
) -> None:
    open_page(browser, node.url)
    beta = row_of(browser, "beta")
    assert beta is not None
    cells = [td.text for td in beta.find_elements(By.TAG_NAME, "td")]
    assert cells[7] == "\u2013"  # unloaded, nothing queued: as `status` says `-`
    # A load from the field of a model that has a row: its error in the row only.
    field = browser.find_element(By.ID, "load-id")
    field.clear()
    field.send_keys("broken\n")
    poll_until(lambda: "failed" in detail_of(browser, "broken"), 10)
    assert browser.find_element(By.ID, "load-error").text == ""


def test_the_node_panel_and_a_phone_card_that_holds_its_error(
    node: Daemon, browser: WebDriver
) -> None:
    from neuronctl import __version__

    open_page(browser, node.url)
    poll_until(lambda: browser.find_element(By.ID, "node").text, 10)
    panel = browser.find_element(By.ID, "node").text
    assert panel.startswith(f"neuronctl {__version__} · node ") and " · up " in panel, panel
    assert "no GPU: CPU only" in panel or "free of" in panel, panel
    button(browser, "broken", "Load").click()
    poll_until(lambda: "failed" in detail_of(browser, "broken"), 10)
    with emulated(browser, phone=True):
        boxes = js(browser, """
            const card = [...document.querySelectorAll('#rows tr.model')]
                .find(r => r.dataset.modelId === 'broken');
            const detail = [...document.querySelectorAll('#rows tr.detail')]
                .find(r => r.dataset.detailFor === 'broken');
            const a = card.getBoundingClientRect(), b = detail.getBoundingClientRect();
            const style = getComputedStyle(detail);
            return [a.left, a.right, a.bottom, b.left, b.right, b.top, style.borderLeftWidth];""")
        card_left, card_right, card_bottom, left, right, top, border = boxes
        # The error sits in the card: the same edges, right under it, inside a border.
        assert abs(left - card_left) < 1 and abs(right - card_right) < 1, boxes
        assert abs(top - card_bottom) < 1 and border == "1px", boxes
        screenshot(browser, "phone-error")


def test_with_a_read_key_the_page_shows_everything_and_offers_no_actions(
    keyed: Daemon, browser: WebDriver,
) -> None:
    browser.get(keyed.url + "/")
    js(browser, "sessionStorage.clear()")
    browser.refresh()
    poll_until(browser.find_element(By.ID, "login").is_displayed, 5)
    browser.find_element(By.ID, "key").send_keys(READ_KEY + "\n")
    poll_until(lambda: status_of(browser, "alpha") == "loaded", 5)
    poll_until(lambda: "monitor" in browser.find_element(By.ID, "key-name").text, 5)
    assert "read-only" in browser.find_element(By.ID, "key-name").text
    assert not browser.find_element(By.ID, "load-id").is_displayed()
    assert not browser.find_element(By.ID, "actions-head").is_displayed()
    row = row_of(browser, "alpha")
    assert row is not None
    assert [b.text for b in row.find_elements(By.CSS_SELECTOR, "button")
            if b.is_displayed()] == ["alpha"]  # the log, not Load or Unload
    row.find_element(By.CSS_SELECTOR, "button.model-name").click()  # logs: the read role's
    poll_until(lambda: "fake llama-server pid" in browser.find_element(By.ID, "log-text").text, 5)
    with emulated(browser, dark=False):
        screenshot(browser, "read-only-key")
    assert csp_violations(browser) == []
    browser.find_element(By.ID, "forget").click()
    poll_until(browser.find_element(By.ID, "login").is_displayed, 5)
