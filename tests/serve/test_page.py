"""The chat page in a real headless Chromium (Debian's, through selenium and chromedriver): load /, set a
system prompt, send a message, watch the reply stream in; a screenshot is kept in the test's tmp dir."""

from __future__ import annotations

import shutil

import pytest

httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def test_page_is_packaged_without_external_resources(server):
    page = httpx.get(server.url + "/")
    script = httpx.get(server.url + "/static/chat.js")
    assert page.status_code == script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    for text in (page.text, script.text):
        assert "http://" not in text and "https://" not in text  # no CDN, nothing fetched from elsewhere
    assert httpx.get(server.url + "/static/../app.py").status_code == 404


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_chat_page_streams_a_reply_in_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "model: tiny")
        driver.find_element(By.ID, "system").send_keys("You answer briefly.")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("24")
        driver.find_element(By.ID, "input").send_keys("What is a tuple?")
        steps_before = server.scheduler.steps
        driver.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
        wait.until(lambda d: reply.get_attribute("data-done") == "true")
        text = reply.text
        assert text and "[error" not in text
        assert server.scheduler.steps > steps_before  # the reply came from the scheduler
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "What is a tuple?"
        assert "chunks" in driver.find_element(By.ID, "status").text
        chunks = int(driver.find_element(By.ID, "status").text.split()[0])
        assert chunks > 1  # streamed in pieces, not one body
        shot = tmp_path / "chat_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 5000
    finally:
        driver.quit()
