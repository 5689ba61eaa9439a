"""The chat page of `offload-moe serve` (offload_moe/server/static/chat.html), driven in headless Chromium.

The browser test needs selenium (`pip install selenium`) and the Debian packages `chromium` and `chromium-driver`;
it is skipped with the reason when any of them is missing. The driver path is passed explicitly, so Selenium
Manager never downloads anything. `served` (tests/serve_util.py) is a real server on a tiny random checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from serve_util import served  # noqa: F401  (fixture; tests/ is on sys.path)

PAGE = Path(__file__).resolve().parents[1] / "offload_moe" / "server" / "static" / "chat.html"
REPLY_TIMEOUT_S = 60


def test_page_loads_nothing_from_outside():
    """No src=/href=/url()/@import/fetch target points off the machine: the page works with no network."""
    html = PAGE.read_text(encoding="utf-8")
    refs = re.findall(r"""\b(?:src|href|action|srcset|poster|formaction)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", html, re.IGNORECASE)
    refs = [a or b or c for a, b, c in refs]
    refs += re.findall(r"""url\(\s*['"]?([^'")]*)""", html, re.IGNORECASE)
    refs += re.findall(r"""@import\s+(?:url\()?\s*['"]?([^'");\s]*)""", html, re.IGNORECASE)
    refs += re.findall(r"""\bfetch\(\s*['"`]([^'"`]*)""", html)
    assert any(r.startswith("/v1/") for r in refs), "expected to see the page's fetch('/v1/...') calls"
    for ref in refs:
        r = ref.strip().lower()
        assert not r.startswith("//"), f"protocol-relative (off-machine) reference: {ref!r}"
        assert not re.match(r"[a-z][a-z0-9+.-]*:", r) or r.startswith("data:"), f"absolute URL: {ref!r}"
    assert not re.search(r"https?:|wss?:|ftp:", html, re.IGNORECASE), "an absolute URL appears in chat.html"
    assert not re.search(r"""["'`]//[a-z0-9]""", html, re.IGNORECASE), "a //host reference appears in chat.html"


def _chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    binary, driver_path = _chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def _wait_reply(drv, n):
    """Wait until the n-th assistant reply is finished (or an error shows); return that element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(d):
        errors = d.find_elements(By.CSS_SELECTOR, "#messages .msg.error")
        if errors:
            return errors[-1]
        replies = d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")
        if len(replies) >= n and replies[n - 1].get_attribute("data-streaming") == "0":
            return replies[n - 1]
        return False

    el = WebDriverWait(drv, REPLY_TIMEOUT_S, poll_frequency=0.2).until(
        finished, message=f"no finished assistant reply #{n} within {REPLY_TIMEOUT_S} s")
    assert "error" not in el.get_attribute("class").split(), f"the page shows an error: {el.text!r}"
    return el


def test_chat_page_streams_a_reply_and_resets(served, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    drv = browser
    drv.get(served.url + "/")
    messages = drv.find_element(By.ID, "messages")
    assert messages.find_elements(By.CSS_SELECTOR, "*") == []
    # A short reply keeps the test quick on a CPU (the field sits in the Settings panel).
    drv.find_element(By.CSS_SELECTOR, "details.settings > summary").click()
    max_tokens = drv.find_element(By.ID, "max_tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")

    box = drv.find_element(By.ID, "input")
    box.send_keys("Hello, who are you?")
    drv.find_element(By.ID, "send").click()
    reply = _wait_reply(drv, 1)

    users = drv.find_elements(By.CSS_SELECTOR, "#messages .msg.user")
    assert [u.text for u in users] == ["Hello, who are you?"]
    assert reply.text.strip(), "the assistant reply is empty"
    chunks = int(reply.get_attribute("data-chunks"))
    assert chunks > 1, f"the reply came in {chunks} chunk(s); expected a stream of several"
    assert drv.find_element(By.ID, "stop").get_attribute("disabled") is not None

    tps = drv.find_element(By.ID, "tps").text
    assert re.search(r"\d+(\.\d+)?", tps), f"#tps shows no number: {tps!r}"
    # /v1/stats is read after the reply, asynchronously.
    WebDriverWait(drv, 10, poll_frequency=0.2).until(
        lambda d: re.fullmatch(r"\d+(\.\d+)?%", d.find_element(By.ID, "hitrate").text.strip()),
        message="#hitrate never showed a percentage")

    # A second turn, sent with Enter, goes out with the history and streams into a second bubble.
    box.send_keys("And then?", Keys.ENTER)
    second = _wait_reply(drv, 2)
    assert second.text.strip()
    assert len(drv.find_elements(By.CSS_SELECTOR, "#messages .msg.user")) == 2

    drv.find_element(By.ID, "reset").click()
    WebDriverWait(drv, 5, poll_frequency=0.1).until(
        lambda d: d.execute_script("return document.getElementById('messages').childNodes.length") == 0,
        message="#messages is not empty after Reset")
