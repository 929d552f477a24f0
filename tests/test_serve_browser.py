"""The web page in a real headless Chromium: upload, overlay, segment list equal to the API's, hover.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Without them the test fails in CI
(CI=true) and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import EXAMPLE, start_cli_server, stop, wait_ready

from mask2former import rle
from mask2former.serve.client import ServeClient

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,800",
]
WAIT_S = 60


def _require_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{' and '.join(missing)} not installed: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (.ci/run installs them)")
        pytest.skip(reason)


@pytest.fixture()
def browser(tmp_path):
    _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture()
def server():
    process, port = start_cli_server()
    try:
        wait_ready(port)
        yield port
    finally:
        stop(process)


def _wait_done(driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d):
        state = d.execute_script("return document.body.dataset.state || ''")
        assert state != "error", d.find_element("id", "status").text
        image_ready = "const o = document.getElementById('overlay'); return o.complete && o.naturalWidth > 0"
        return state == "done" and d.execute_script(image_ready)

    WebDriverWait(driver, WAIT_S).until(settled)


def _rows(driver) -> list[tuple[str, str, str, str]]:
    rows = driver.find_elements("css selector", "#segments tbody tr")
    return [
        (
            row.get_attribute("data-id"),
            row.find_element("css selector", ".name").text,
            row.find_element("css selector", ".score").text,
            row.find_element("css selector", ".area").text,
        )
        for row in rows
    ]


def _expected_rows(port: int, **params) -> tuple[list, list[dict]]:
    client = ServeClient("127.0.0.1", port)
    segments = client.predict(EXAMPLE.read_bytes(), **params).json()["segments"]
    client.close()
    rows = [(str(s["id"]), s["class_name"], f"{s['score']:.3f}", str(s["area"])) for s in segments]
    return rows, segments


@pytest.mark.slow
def test_page_uploads_shows_overlay_and_segments_and_highlights_on_hover(browser, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select, WebDriverWait

    port = server
    browser.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(browser, WAIT_S).until(lambda d: len(Select(d.find_element("id", "task")).options) == 3)
    assert Select(browser.find_element("id", "task")).first_selected_option.text == "panoptic"

    # 1. upload through the file input, default threshold 0.5
    browser.find_element("id", "file").send_keys(str(EXAMPLE))
    _wait_done(browser)
    expected, segments = _expected_rows(port, task="panoptic", threshold=0.5)
    assert len(expected) >= 3 and _rows(browser) == expected
    overlay = browser.execute_script(
        "const o = document.getElementById('overlay'); return [o.naturalWidth, o.naturalHeight]"
    )
    assert overlay == [256, 256]  # the server's picture of the 128x128 scene, enlarged 2x as predict draws it

    # 2. hovering a row paints that segment's RLE-decoded mask over the picture
    row = browser.find_elements("css selector", "#segments tbody tr")[0]
    ActionChains(browser).move_to_element(row).perform()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: (
            d.execute_script("return document.getElementById('highlight').dataset.segment") == expected[0][0]
        )
    )
    mask = rle.decode(segments[0]["mask"])[0]
    inside = tuple(int(v) for v in np.argwhere(mask)[0])  # (y, x)
    outside = tuple(int(v) for v in np.argwhere(~mask)[0])
    pixel = (
        "const context = document.getElementById('highlight').getContext('2d');"
        "return Array.from(context.getImageData(arguments[0], arguments[1], 1, 1).data)"
    )
    assert browser.execute_script(pixel, inside[1], inside[0]) == [*segments[0]["color"], 150]
    assert browser.execute_script(pixel, outside[1], outside[0])[3] == 140
    assert "active" in row.get_attribute("class")
    screenshot = tmp_path / "serve-page.png"
    assert browser.save_screenshot(str(screenshot))
    picture = np.asarray(Image.open(screenshot).convert("RGB"))
    assert picture.shape[0] > 300 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # not blank
    if os.environ.get("MASK2FORMER_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(os.environ["MASK2FORMER_SCREENSHOT_DIR"]) / screenshot.name)

    # 3. drop a file on the drop zone after choosing another task and threshold
    Select(browser.find_element("id", "task")).select_by_value("instance")
    _wait_done(browser)
    browser.execute_script(
        "const s = document.getElementById('threshold'); s.value = '0.9';"
        "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));"
    )
    _wait_done(browser)
    drop = """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        const event = new DragEvent('drop', {dataTransfer: data, bubbles: true});
        document.getElementById('drop').dispatchEvent(event);
    """
    flipped = io.BytesIO()
    Image.open(EXAMPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped, format="PNG")
    browser.execute_script(drop, base64.b64encode(flipped.getvalue()).decode())
    _wait_done(browser)
    client = ServeClient("127.0.0.1", port)
    segments = client.predict(flipped.getvalue(), task="instance", threshold=0.9).json()["segments"]
    client.close()
    assert segments and _rows(browser) == [
        (str(s["id"]), s["class_name"], f"{s['score']:.3f}", str(s["area"])) for s in segments
    ]
    assert browser.find_element("id", "threshold-value").text == "0.90"
