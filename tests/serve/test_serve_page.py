"""The web page in a real headless Chromium: upload an image, wait for its labels, check that the
attention heat-map is drawn over it, save a screenshot (under NXTP_ARTIFACTS too, if set).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); without them the test fails."""

import os
import pathlib
import shutil

import httpx
import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium() -> webdriver.Chrome:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), f"{path} not found: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the driver path: no download


def test_page_tags_an_upload_and_draws_the_attention_overlay(server, tmp_path):
    # A plain grey picture with a dark disc: the heat-map stands out on it in the screenshot.
    yy, xx = np.mgrid[:120, :160]
    disc = (yy - 60) ** 2 + (xx - 100) ** 2 < 30**2
    upload = tmp_path / "disc.png"
    Image.fromarray(np.where(disc[..., None], [40, 60, 90], [200, 200, 200]).astype(np.uint8)).save(upload)
    want = httpx.post(f"{server}/v1/tag", content=upload.read_bytes(), params={"num_labels": 8},
                      headers={"Content-Type": "image/png"}).json()["labels"]
    driver = chromium()
    try:
        driver.get(server)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        assert driver.find_element(By.ID, "num_labels").get_attribute("value") == "8"  # from /v1/info
        driver.find_element(By.ID, "files").send_keys(str(upload))
        WebDriverWait(driver, 120).until(
            lambda d: d.execute_script("const c = document.querySelector('.card'); return c && c.dataset.state !== 'tagging' && c.dataset.state")
        )
        card = driver.find_element(By.CSS_SELECTOR, ".card")
        assert card.get_attribute("data-state") == "done", card.find_element(By.CSS_SELECTOR, ".error").text
        names = [e.get_attribute("textContent") for e in card.find_elements(By.CSS_SELECTOR, ".labels .name")]
        assert names == [x["label"] or "(empty)" for x in want]
        probs = [float(e.text) for e in card.find_elements(By.CSS_SELECTOR, ".labels .prob")]
        assert probs == [round(x["prob"], 3) for x in want]
        # The overlay canvas holds the heat-map: opaque-ish pixels of more than one colour.
        pixels = driver.execute_script(
            "const c = document.querySelector('.card .overlay');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const seen = new Set(); let painted = 0;"
            "for (let i = 0; i < d.length; i += 4) { if (d[i + 3] > 0) { painted++; seen.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]); } }"
            "return [c.width * c.height, painted, seen.size];"
        )
        assert pixels[0] == 256 * 256 and pixels[1] == pixels[0] and pixels[2] > 10, pixels
        image_pixels = driver.execute_script(
            "const c = document.querySelector('.card .image');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let lit = 0; for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 0) lit++; return lit;"
        )
        assert image_pixels > 0.9 * 256 * 256
        shot = tmp_path / "serve_page.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    if os.environ.get("NXTP_ARTIFACTS"):
        artifacts = pathlib.Path(os.environ["NXTP_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, artifacts / shot.name)
