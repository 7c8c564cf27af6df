"""The web page end to end in headless Chromium (Debian's chromium + chromedriver, driven by Selenium).

Skips only when /usr/bin/chromium is absent (CI installs it: see .ci/run).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from fake_florence import FakeFlorence, answer, running_server
from PIL import Image

from fiore.serve import ServeConfig, create_app

SCENE = Path(__file__).parents[1] / "examples" / "scene.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists(),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_page_runs_tasks_draws_answers_and_region(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    fake = FakeFlorence()
    with running_server(create_app(fake, ServeConfig())) as url:
        browser.get(url + "/")
        # the task list comes from GET /v1/tasks; od and caption are ticked by default
        wait_for(browser, lambda d: d.find_element(By.ID, "tasks").get_attribute("data-loaded") == "1")
        assert browser.find_element(By.ID, "task-od").is_selected()
        assert browser.find_element(By.ID, "task-caption").is_selected()
        browser.find_element(By.ID, "image").send_keys(str(SCENE))
        wait_for(browser, lambda d: d.find_element(By.ID, "run").is_enabled())
        browser.find_element(By.ID, "task-caption_to_phrase_grounding").click()
        browser.find_element(By.ID, "text").send_keys("a red star")
        browser.find_element(By.ID, "run").click()
        wait_for(browser, lambda d: d.find_element(By.ID, "json").text.strip().startswith("{"))
        shown = json.loads(browser.find_element(By.ID, "json").text)
        image = Image.open(SCENE).convert("RGB")
        assert shown == {
            "od": answer(image, "od").to_json(),
            "caption": answer(image, "caption").to_json(),
            "caption_to_phrase_grounding": answer(image, "caption_to_phrase_grounding", "a red star").to_json(),
        }
        answers = browser.find_element(By.ID, "answers").text
        assert answer(image, "caption").text in answers and "a red star" in answers
        canvas = browser.find_element(By.ID, "canvas")
        assert canvas.get_attribute("data-drawn") == "3"  # 2 od boxes + 1 grounded box
        # the drawn box shows on the canvas in the label's colour, over the image
        shot = Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")
        shot = shot.crop((1, 1, shot.width - 1, shot.height - 1))  # the 1 px CSS border
        assert shot.size == image.size  # shown at natural size (narrower than 900 px)
        x1, y1, x2, y2 = answer(image, "od").boxes[0]
        edge = (round(x1), round((y1 + y2) / 2))
        inside = (round((x1 + x2) / 2), round(y1 + 0.8 * (y2 - y1)))

        def differs(p):
            return max(abs(a - b) for a, b in zip(shot.getpixel(p), image.getpixel(p), strict=True)) > 40

        assert differs(edge) and not differs(inside)  # outline drawn over the image, interior left alone
        assert "done in" in browser.find_element(By.ID, "status").text

        # draw a region by dragging on the canvas and ask for its category
        for name in ("od", "caption", "caption_to_phrase_grounding"):
            browser.find_element(By.ID, f"task-{name}").click()
        browser.find_element(By.ID, "task-region_to_category").click()
        w, h = canvas.size["width"], canvas.size["height"]
        ActionChains(browser).move_to_element_with_offset(canvas, -w // 4, -h // 4).click_and_hold().move_by_offset(
            w // 4, h // 4
        ).release().perform()
        region = [float(v) for v in browser.find_element(By.ID, "region").get_attribute("value").split(",")]
        # canvas shown at natural size: a quarter of the width from the top-left quarter point
        assert region[0] == pytest.approx(image.width / 4, abs=4) and region[2] == pytest.approx(image.width / 2, abs=4)
        assert region[1] == pytest.approx(image.height / 4, abs=4) and region[3] == pytest.approx(
            image.height / 2, abs=4
        )
        browser.find_element(By.ID, "run").click()
        wait_for(browser, lambda d: "region_to_category" in d.find_element(By.ID, "json").text)
        shown = json.loads(browser.find_element(By.ID, "json").text)
        assert shown == {"region_to_category": answer(image, "region_to_category", region=region).to_json()}

        # a server-side refusal is shown to the user
        browser.find_element(By.ID, "region").clear()
        browser.find_element(By.ID, "run").click()
        wait_for(browser, lambda d: "needs a region" in d.find_element(By.ID, "status").text)
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
