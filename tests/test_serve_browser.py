"""The web page at ``/`` of ``neuraldb serve``: its files and headers (always), and a real headless Chromium driven by
Selenium against uvicorn on a loopback port (skipped, saying why, without Chromium, chromedriver or selenium; CI
installs Debian's ``chromium`` and ``chromium-driver``, see .ci/run): add a fact, see it listed and found, ask a
prompt with and without the edits side by side, delete the fact."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from _serve_helpers import TOKEN, app_for
from _tiny_editing import FACTS
from fastapi.testclient import TestClient
from neuraldb.serve import serving


def test_page_files_and_headers():
    app, *_ = app_for(protect_reads=True)  # the page itself holds no data: served without the token
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        html = page.text
        assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["/ui/style.css", "/ui/app.js"]
        for url, kind in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
            r = client.get(url)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.text
        js = client.get("/ui/app.js").text
        assert "localStorage" not in js and "sessionStorage" not in js and "document.cookie" not in js
        assert "innerHTML" not in js  # facts are shown as text, never parsed as HTML
        for text in (html, js, client.get("/ui/style.css").text):
            assert not re.search(r"https?://", text), "the page must load nothing from elsewhere"
        assert client.get("/v1/facts").status_code == 401


def _browser():
    """A headless Chromium driver, or pytest.skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-dev.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None)
        pytest.skip(f"{missing} not installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a browser to download
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _complete(base, prompt, edits):
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "neuraldb": {"edits": edits}}
    req = urllib.request.Request(
        f"{base}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["text"]


def test_page_in_headless_chromium():
    driver = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, *_ = app_for(layer=2)  # layer 2: the tiny model's answer changes once FACTS[0] is edited in
    fact = FACTS[0]
    try:
        with serving(app) as base:
            wait = WebDriverWait(driver, 60)

            def text(element_id):
                return driver.find_element(By.ID, element_id).text

            def until_text(element_id, pattern):
                wait.until(lambda d: re.search(pattern, text(element_id)))
                return text(element_id)

            def fill(element_id, value):
                field = driver.find_element(By.ID, element_id)
                field.clear()
                field.send_keys(value)

            driver.get(base + "/")
            assert driver.title == "neuraldb serve"
            until_text("facts-status", r"^0 facts\.")
            until_text("health", "Serving 0 facts")

            fill("subject", fact.subject)
            fill("fact-prompt", fact.prompt)
            fill("target-new", fact.target_new)
            driver.find_element(By.ID, "add").click()  # no token yet: refused, and the page says why
            assert "token" in until_text("add-status", "Could not add")

            fill("token", TOKEN)
            driver.find_element(By.ID, "add").click()
            until_text("add-status", r"^Fact 0 added\.")
            until_text("facts-status", r"^1 fact\.")
            rows = driver.find_elements(By.CSS_SELECTOR, "#facts tbody tr")
            cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
            assert len(rows) == 1 and cells[:5] == ["0", fact.subject, fact.prompt, fact.target_new, "stored"]

            fill("search", "darrieux")
            driver.find_element(By.ID, "search-button").click()
            until_text("facts-status", "1 fact matching")
            fill("search", "no such fact")
            driver.find_element(By.ID, "search-button").click()
            until_text("facts-status", r"^0 facts matching")
            assert driver.find_elements(By.CSS_SELECTOR, "#facts tbody tr") == []
            fill("search", "")
            driver.find_element(By.ID, "search-button").click()
            until_text("facts-status", r"^1 fact\.")

            fill("prompt", fact.text)
            fill("max-tokens", "3")
            driver.find_element(By.ID, "ask").click()
            until_text("ask-status", "^Done")
            edited, plain = text("answer-edited"), text("answer-plain")
            assert edited == _complete(base, fact.text, True).strip()
            assert plain == _complete(base, fact.text, False).strip()
            assert edited != plain and "the edits change this answer" in text("ask-status")

            driver.find_element(By.CSS_SELECTOR, "#facts tbody tr[data-id='0'] button.delete").click()
            until_text("facts-status", r"^Deleted fact 0\. 0 facts\.")
            assert driver.find_elements(By.CSS_SELECTOR, "#facts tbody tr") == []
            assert app.state.neuraldb.db.ids() == []
            driver.find_element(By.ID, "ask").click()
            until_text("ask-status", "do not change")
            assert text("answer-edited") == text("answer-plain") == plain
            severe = [
                e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "/v1/facts" not in e["message"]
            ]
            assert severe == [], severe  # no script errors (the refused POST above is logged as a 401)
    finally:
        driver.quit()
