"""The web playground in headless Chromium: a prompt typed in the page gives the API's exact image, directly and
through the nginx front with a key; previews stream in before the image; a generated image edited with a
painted mask gives the API's edit; no console error and no request to another origin."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.helpers import ROOT, ServerHandle, start_server

try:  # the front's own fixture; its module skips itself where nginx or supervisord is missing
    from tests.e2e.test_deploy_stack import API_KEY, Stack, stack  # noqa: F401 (stack is a fixture)

    FRONT_MISSING = ""
except pytest.skip.Exception as missing:
    FRONT_MISSING = str(missing)

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason=f"needs Debian's chromium and chromium-driver (found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}); "
    "install with: apt-get install -y chromium chromium-driver",
)
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
# The exact body the page must send for the form filled in by `fill_and_generate`.
EXPECTED_BODY = {
    "prompt": "the digit 5",
    "n": 1,
    "output_format": "png",
    "response_format": "b64_json",
    "seed": 3,
}
WAIT_S = 120  # a generation on 2 shared CPU cores, or the first one after a worker restart
# Set to write the first test's screenshot to docs/playground.png (the README shows it).
UPDATE_SCREENSHOT_ENV = "UPDATE_PLAYGROUND_SCREENSHOT"
# Folder where every browser test also saves its screenshot (default: the test's own tmp_path).
ARTIFACTS_ENV = "TEST_ARTIFACTS_DIR"


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with its console and network logs, saving downloads to tmp_path/downloads."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1180,860"):
        options.add_argument(argument)
    # The console for errors; the network log for every URL the page requested and the body it posted.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(tmp_path / "downloads"), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path) as driver:
        yield driver


def wait_for(driver: WebDriver, condition: Any, what: str, timeout: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        condition, message=f"{what}; page error: {driver.find_element(By.ID, 'error').text!r}"
    )


def status(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "model-status").get_attribute("data-state"))


def open_and_fill(browser: WebDriver, server: ServerHandle, recorder: str, *, prompt: str, seed: int) -> None:
    """The page, ready, with `recorder` (a script watching what the page does) running, and the form filled
    in for a PNG of `prompt` from `seed`."""
    browser.get(f"{server.base_url}/")
    wait_for(browser, lambda d: status(d) == "ready", "the page to read the model from /v1/models", 30)
    browser.execute_script(recorder)
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "seed").send_keys(str(seed))
    Select(browser.find_element(By.ID, "format")).select_by_value("png")


def fill_and_generate(driver: WebDriver) -> None:
    # Records whether the progress state showed, however quickly the answer comes.
    driver.execute_script(
        """
        const progress = document.getElementById("progress");
        window.progressShown = false;
        new MutationObserver(() => { window.progressShown ||= !progress.hidden; })
          .observe(progress, { attributes: true });
        """
    )
    driver.find_element(By.ID, "prompt").send_keys(EXPECTED_BODY["prompt"])
    driver.find_element(By.ID, "seed").send_keys(str(EXPECTED_BODY["seed"]))
    Select(driver.find_element(By.ID, "format")).select_by_value("png")
    driver.find_element(By.ID, "generate").click()


def result_images(driver: WebDriver, count: int) -> list[Any]:
    """The result's images once `count` of them are shown and decoded by the browser."""

    def loaded(d: WebDriver) -> list[Any] | bool:
        images = d.find_elements(By.CSS_SELECTOR, "#result-images img")
        done = len(images) == count and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in images
        )
        return images if done else False

    return list(wait_for(driver, loaded, f"{count} image(s) in the result"))


def downloaded(driver: WebDriver, card: Any, folder: Path) -> bytes:
    """The bytes the card's download link saves (the browser's download, not a second API call)."""
    link = card.find_element(By.CSS_SELECTOR, "a[download]")
    target = folder / str(link.get_attribute("download"))
    link.click()
    wait_for(
        driver, lambda _: target.exists() and target.stat().st_size > 0, f"the download of {target.name}", 30
    )
    return target.read_bytes()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG", image.format
        return np.asarray(image.convert("RGB"))


def network_log(driver: WebDriver) -> list[dict[str, Any]]:
    """Chrome's Network.requestWillBeSent events since the last read."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [e["params"]["request"] for e in events if e["method"] == "Network.requestWillBeSent"]


def api_image(base_url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    response = httpx.post(f"{base_url}{GENERATIONS}", json=body, headers=headers or {}, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def check_same_image_as_api(
    driver: WebDriver,
    requests: list[dict[str, Any]],
    base_url: str,
    downloads: Path,
    headers: dict[str, str] | None = None,
) -> None:
    """The page posted the expected body, and its image has the API's pixels for that very body."""
    posts = [r for r in requests if r["method"] == "POST" and r["url"].endswith(GENERATIONS)]
    assert len(posts) == 1, posts
    sent = json.loads(posts[0]["postData"])
    # The page names the model it read from /v1/models, so a server of several models answers with that one.
    assert sent == {**EXPECTED_BODY, "model": sent.get("model")} and sent["model"]
    result_images(driver, 1)
    in_page = pixels(
        downloaded(driver, driver.find_element(By.CSS_SELECTOR, "#result-images .card"), downloads)
    )
    from_api = pixels(api_image(base_url, sent, headers))
    assert in_page.shape == from_api.shape == (32, 32, 3)
    assert np.array_equal(in_page, from_api)
    # A blank image would match too; the digits model draws strokes on a plain background.
    assert in_page.std() > 10


def check_result_panel(driver: WebDriver) -> None:
    caption = driver.find_element(By.CSS_SELECTOR, "#result-images figcaption").text
    assert "seed 3" in caption, caption
    link = driver.find_element(By.CSS_SELECTOR, "#result-images a[download]")
    assert link.get_attribute("download") == "diffuserve-the-digit-5-3.png"
    assert str(link.get_attribute("href")).startswith("blob:")
    timing = driver.find_element(By.ID, "timing").text
    for label in ("round trip (browser)", "x-queue-ms", "x-inference-ms", "server-timing: queue"):
        assert label in timing, timing
    assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 1


def check_only_same_origin(requests: list[dict[str, Any]], base_url: str) -> None:
    foreign = [r["url"] for r in requests if not r["url"].startswith((f"{base_url}/", "data:", "blob:"))]
    assert not foreign, foreign


def console_errors(driver: WebDriver) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def save_screenshot(driver: WebDriver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get(ARTIFACTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # The whole page, gallery included: grow the window to the document's height first.
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    driver.set_window_size(driver.get_window_size()["width"], height + chrome)
    assert driver.save_screenshot(str(path)), path
    return path


@needs_chromium
def test_page_generates_the_apis_image(server: ServerHandle, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(f"{server.base_url}/")
    wait_for(browser, lambda d: status(d) == "ready", "the page to read the model from /v1/models", 30)
    assert browser.find_element(By.ID, "key-box").is_displayed() is False  # no keys on this server
    assert browser.find_element(By.ID, "negative-box").is_displayed() is False  # a FLUX model
    # The model card's extensions fill the form's defaults.
    assert Select(browser.find_element(By.ID, "size")).first_selected_option.text == "model default (32x32)"
    assert browser.find_element(By.ID, "steps").get_attribute("placeholder") == "default 4"
    fill_and_generate(browser)
    result_images(browser, 1)
    assert browser.execute_script("return window.progressShown") is True
    assert not browser.find_element(By.ID, "progress").is_displayed()
    requests = network_log(browser)
    check_same_image_as_api(browser, requests, server.base_url, tmp_path / "downloads")
    check_result_panel(browser)

    # Server-Timing is read generically: the entries the server adds later show without a page change.
    parsed = browser.execute_script(
        """return parseServerTiming('queue;dur=0.4, denoise;desc="28 steps, bf16";dur=812.5,'
        + 'decode;dur=91, encode;dur=12.25, transfer;dur=3, cache')"""
    )
    assert [(m["name"], m["dur"], m["desc"]) for m in parsed] == [
        ("queue", 0.4, ""),
        ("denoise", 812.5, "28 steps, bf16"),
        ("decode", 91, ""),
        ("encode", 12.25, ""),
        ("transfer", 3, ""),
        ("cache", None, ""),
    ]

    # "reuse" puts the last seed back; "random" empties the field so the server picks one.
    browser.find_element(By.ID, "seed-random").click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == ""
    browser.find_element(By.ID, "seed-reuse").click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "3"

    # Several images at once: consecutive seeds, each shown and kept in the session's gallery.
    count = browser.find_element(By.ID, "n")
    count.clear()
    count.send_keys("4")
    Select(browser.find_element(By.ID, "format")).select_by_value("webp")
    browser.find_element(By.ID, "generate").click()
    wait_for(
        browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 5, "5 in the gallery"
    )
    result_images(browser, 4)
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#result-images figcaption")]
    assert [c.split()[1] for c in captions] == ["3", "4", "5", "6"], captions

    requests += network_log(browser)
    check_only_same_origin(requests, server.base_url)
    assert console_errors(browser) == []
    shot = save_screenshot(browser, "playground.png", tmp_path)
    if os.environ.get(UPDATE_SCREENSHOT_ENV):
        shutil.copyfile(shot, ROOT / "docs" / "playground.png")


@needs_chromium
def test_page_picks_among_several_models(browser: WebDriver, tmp_path: Path) -> None:
    """A server of two models: the page lists both, and asks the one picked for its images."""
    with start_server(MODELS="digits,tiny-random", IMAGE_STORE_DIR=str(tmp_path / "store")) as server:
        browser.get(f"{server.base_url}/")
        wait_for(browser, lambda d: status(d) == "ready", "the page to read the models from /v1/models", 60)
        picker = Select(browser.find_element(By.ID, "model-select"))
        assert browser.find_element(By.ID, "model-select").is_displayed()
        assert [o.text for o in picker.options] == ["digits-xl-bs4", "tiny-random-xl-bs4"]
        picker.select_by_value("tiny-random-xl-bs4")
        wait_for(
            browser, lambda d: d.find_element(By.ID, "model-status").text == "tiny-random-xl-bs4", "the pick"
        )
        network_log(browser)  # only what follows
        fill_and_generate(browser)
        result_images(browser, 1)
        posts = [r for r in network_log(browser) if r["method"] == "POST" and r["url"].endswith(GENERATIONS)]
        sent = json.loads(posts[0]["postData"])
        assert sent["model"] == "tiny-random-xl-bs4"
        # The answer came from that model: the timing panel shows the response's x-model header.
        timing = browser.find_element(By.ID, "timing").text
        assert "tiny-random-xl-bs4" in timing and "digits" not in timing, timing
        assert console_errors(browser) == []


@needs_chromium
def test_page_applies_an_adapter_the_model_takes(browser: WebDriver, tmp_path: Path) -> None:
    """A server with the digits model's shipped adapter: the page lists it under the model, sends it with its
    scale, and shows the API's image for that body (not the plain one)."""
    from diffuserve.models.digits.lora_train import MIRROR_WEIGHTS

    with start_server(LORAS=f"mirror={MIRROR_WEIGHTS}", IMAGE_STORE_DIR=str(tmp_path / "store")) as server:
        browser.get(f"{server.base_url}/")
        wait_for(browser, lambda d: status(d) == "ready", "the page to read the model from /v1/models", 60)
        wait_for(browser, lambda d: d.find_element(By.ID, "lora-box").is_displayed(), "the adapter list")
        picker = Select(browser.find_element(By.ID, "lora"))
        assert [o.text for o in picker.options] == ["none", "mirror (rank 4)"]
        picker.select_by_value("mirror")
        scale = browser.find_element(By.ID, "lora-scale")
        scale.clear()
        scale.send_keys("0.9")
        network_log(browser)  # only what follows
        fill_and_generate(browser)
        result_images(browser, 1)
        posts = [r for r in network_log(browser) if r["method"] == "POST" and r["url"].endswith(GENERATIONS)]
        sent = json.loads(posts[0]["postData"])
        assert sent["loras"] == [{"name": "mirror", "scale": 0.9}]
        card = browser.find_element(By.CSS_SELECTOR, "#result-images .card")
        in_page = pixels(downloaded(browser, card, tmp_path / "downloads"))
        assert np.array_equal(in_page, pixels(api_image(server.base_url, sent)))
        plain = {key: value for key, value in sent.items() if key != "loras"}
        assert not np.array_equal(in_page, pixels(api_image(server.base_url, plain)))
        assert console_errors(browser) == []


@needs_chromium
@pytest.mark.skipif(bool(FRONT_MISSING), reason=FRONT_MISSING)
def test_page_through_the_front_with_a_key(stack: Stack, browser: WebDriver, tmp_path: Path) -> None:
    browser.get(f"{stack.public}/playground")
    # The page itself needs no key; the API behind it does, and the page asks for one.
    wait_for(browser, lambda d: status(d) == "locked", "the page to ask for a key", 30)
    key = browser.find_element(By.ID, "api-key")
    assert key.is_displayed()
    key.send_keys(API_KEY + "\t")  # a change event: the page stores the key and reloads the model card
    wait_for(browser, lambda d: status(d) == "ready", "the page to accept the key", 30)
    fill_and_generate(browser)
    result_images(browser, 1)
    requests = network_log(browser)
    check_same_image_as_api(
        browser, requests, stack.public, tmp_path / "downloads", {"Authorization": f"Bearer {API_KEY}"}
    )
    check_only_same_origin(requests, stack.public)
    # The page sent the key only as a bearer header, and only to the API.
    keyed = [r["url"] for r in requests if r["headers"].get("Authorization") == f"Bearer {API_KEY}"]
    assert keyed and all("/v1/" in url for url in keyed), keyed
    # The one expected console line: the keyless /v1/models call that told the page a key is needed.
    errors = console_errors(browser)
    assert all("/v1/models" in e["message"] and "401" in e["message"] for e in errors), errors
    assert len(errors) <= 1, errors
    save_screenshot(browser, "playground-front.png", tmp_path)


def api_stream(base_url: str, path: str, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    """The events of a streamed answer, as (event name, payload)."""
    events = []
    with httpx.stream("POST", f"{base_url}{path}", timeout=WAIT_S, **body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for block in response.read().decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            if lines:
                events.append((lines["event"], json.loads(lines["data"])))
    return events


# Records, in order, the cards the page puts in the result (its previews, then its images), and the most
# cards shown at once.
RECORD_RESULT_CARDS = """
window.resultCards = [];
window.mostCards = 0;
const shown = document.getElementById("result-images");
new MutationObserver((records) => {
  for (const record of records) for (const node of record.addedNodes) {
    if (node.classList && node.classList.contains("card")) {
      window.resultCards.push(node.classList.contains("preview") ? "preview" : "image");
    }
  }
  window.mostCards = Math.max(window.mostCards, shown.children.length);
}).observe(shown, { childList: true });
"""


@needs_chromium
def test_previews_arrive_then_the_apis_image(
    server: ServerHandle, browser: WebDriver, tmp_path: Path
) -> None:
    open_and_fill(browser, server, RECORD_RESULT_CARDS, prompt="the digit 2", seed=7)
    browser.find_element(By.ID, "previews").click()
    Select(browser.find_element(By.ID, "partial-images")).select_by_value("3")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 1, "the image")
    result_images(browser, 1)

    # Each preview took the place of the one before, and the image took the last preview's place.
    cards = browser.execute_script("return window.resultCards")
    assert cards[-1] == "image" and cards[0] == "preview" and cards.count("image") == 1, cards
    assert browser.execute_script("return window.mostCards") == 1
    assert not browser.find_elements(By.CSS_SELECTOR, "#result-images .preview")
    requests = network_log(browser)
    posts = [r for r in requests if r["method"] == "POST" and r["url"].endswith(GENERATIONS)]
    assert len(posts) == 1, posts
    assert posts[0]["headers"]["Accept"] == "text/event-stream"
    sent = json.loads(posts[0]["postData"])
    assert sent == {
        "model": "digits-xl-bs8",
        "prompt": "the digit 2",
        "n": 1,
        "output_format": "png",
        "response_format": "b64_json",
        "stream": True,
        "partial_images": 3,
        "seed": 7,
    }
    events = api_stream(server.base_url, GENERATIONS, json=sent)
    assert [name for name, _ in events][-1] == "image_generation.completed"
    assert cards.count("preview") == len(events) - 1 >= 1
    in_page = pixels(
        downloaded(
            browser, browser.find_element(By.CSS_SELECTOR, "#result-images .card"), tmp_path / "downloads"
        )
    )
    assert np.array_equal(in_page, pixels(base64.b64decode(events[-1][1]["b64_json"])))
    assert in_page.std() > 10
    assert "seed 7" in browser.find_element(By.CSS_SELECTOR, "#result-images figcaption").text
    assert "first preview (browser)" in browser.find_element(By.ID, "timing").text

    # Two images: each has its previews in its own place, then its image with its own seed.
    browser.execute_script("window.resultCards = []; window.mostCards = 0")
    count = browser.find_element(By.ID, "n")
    count.clear()
    count.send_keys("2")
    Select(browser.find_element(By.ID, "partial-images")).select_by_value("1")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 3, "2 more images")
    result_images(browser, 2)
    assert sorted(browser.execute_script("return window.resultCards")) == [
        "image",
        "image",
        "preview",
        "preview",
    ]
    assert browser.execute_script("return window.mostCards") == 2
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#result-images figcaption")]
    assert [c.split()[1] for c in captions] == ["7", "8"], captions

    # An error event is shown like any other error, and its previews go. The server sends one only when a
    # generation fails after its stream began, so this answer is made in the page.
    browser.execute_script(
        """
        const stream = 'event: image_generation.partial_image\\r\\ndata: '
          + JSON.stringify({ type: "image_generation.partial_image", b64_json: "", partial_image_index: 0,
                             output_format: "png" })
          + '\\r\\n\\r\\n: a comment\\n\\nevent: error\\ndata: '
          + JSON.stringify({ type: "error", error: { message: "generation failed: out of memory",
                                                     type: "server_error", param: null, code: null } })
          + '\\n\\n';
        const chunks = stream.match(/[\\s\\S]{1,7}/g).map((chunk) => new TextEncoder().encode(chunk));
        window.fetch = async () => new Response(new ReadableStream({
          start(controller) { chunks.forEach((chunk) => controller.enqueue(chunk)); controller.close(); },
        }), { headers: { "Content-Type": "text/event-stream" } });
        """
    )
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), "the error")
    assert browser.find_element(By.ID, "error").text == "generation failed: out of memory"
    assert not browser.find_elements(By.CSS_SELECTOR, "#result-images .preview")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 3

    requests += network_log(browser)
    check_only_same_origin(requests, server.base_url)
    assert console_errors(browser) == []
    save_screenshot(browser, "playground-previews.png", tmp_path)


# Keeps, for the test, every multipart form the page passes to fetch: text fields as text, files as base64.
RECORD_FORMS = """
window.sentForms = [];
const send = window.fetch;
window.fetch = async (url, init) => {
  if (init && init.body instanceof FormData) {
    const fields = [];
    for (const [name, value] of init.body.entries()) {
      if (!(value instanceof Blob)) { fields.push([name, value]); continue; }
      const bytes = new Uint8Array(await value.arrayBuffer());
      fields.push([name, { filename: value.name, type: value.type,
                           b64: btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join("")) }]);
    }
    window.sentForms.push({ url: String(url), fields });
  }
  return send(url, init);
};
"""


def paint_left_half(driver: WebDriver) -> None:
    """One stroke down the middle of the left half with a brush half the picture wide: columns 0–15 of 32."""
    brush = driver.find_element(By.ID, "brush")
    driver.execute_script("arguments[0].value = '16'; arguments[0].dispatchEvent(new Event('input'))", brush)
    assert driver.find_element(By.ID, "brush-value").text == "16 px"
    canvas = driver.find_element(By.ID, "mask-canvas")
    width, height = canvas.size["width"], canvas.size["height"]
    ActionChains(driver).move_to_element_with_offset(
        canvas, -round(width / 4), -round(height / 2) + 2
    ).click_and_hold().move_by_offset(0, round(height) - 4).release().perform()


@needs_chromium
def test_page_edits_a_generated_image_with_a_painted_mask(
    server: ServerHandle, browser: WebDriver, tmp_path: Path
) -> None:
    open_and_fill(browser, server, RECORD_FORMS, prompt="the digit 3", seed=0)
    browser.find_element(By.ID, "generate").click()
    result_images(browser, 1)

    browser.find_element(By.CSS_SELECTOR, "#result-images .edit-this").click()
    wait_for(
        browser, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), "the picture to edit", 30
    )
    assert browser.find_element(By.ID, "generate").text == "Edit"
    assert Select(browser.find_element(By.ID, "size")).first_selected_option.text == "the picture's size"
    assert browser.find_element(By.ID, "strength").get_attribute("placeholder") == "default 0.6"
    paint_left_half(browser)
    assert browser.find_element(By.ID, "strength").get_attribute("placeholder") == "default 1.0"
    for field, value in (("prompt", "the digit 8"), ("seed", "1"), ("strength", "1.0")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 2, "the edit")
    result_images(browser, 1)

    forms = browser.execute_script("return window.sentForms")
    assert len(forms) == 1 and forms[0]["url"] == "v1/images/edits", forms
    fields = dict(forms[0]["fields"])
    image, mask = fields.pop("image"), fields.pop("mask")
    assert fields == {
        "model": "digits-xl-bs8",
        "prompt": "the digit 8",
        "n": "1",
        "output_format": "png",
        "response_format": "b64_json",
        "strength": "1",
        "seed": "1",
    }
    assert (image["filename"], image["type"]) == ("diffuserve-the-digit-3-0.png", "image/png")
    assert (mask["filename"], mask["type"]) == ("mask.png", "image/png")
    source = pixels(base64.b64decode(image["b64"]))
    mask_png = base64.b64decode(mask["b64"])
    with Image.open(io.BytesIO(mask_png)) as opened:
        assert opened.format == "PNG" and opened.size == (32, 32)
        alpha = np.asarray(opened.convert("RGBA").getchannel("A"))
    painted = np.zeros((32, 32), dtype=bool)
    painted[:, :16] = True
    assert np.array_equal(alpha == 0, painted) and np.all(alpha[~painted] == 255)

    requests = network_log(browser)
    posts = [r for r in requests if r["method"] == "POST" and r["url"].endswith(EDITS)]
    assert len(posts) == 1, posts
    assert posts[0]["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")

    in_page = pixels(
        downloaded(
            browser, browser.find_element(By.CSS_SELECTOR, "#result-images .card"), tmp_path / "downloads"
        )
    )
    response = httpx.post(
        f"{server.base_url}{EDITS}",
        files=[
            ("image", (image["filename"], base64.b64decode(image["b64"]), image["type"])),
            ("mask", ("mask.png", mask_png, "image/png")),
        ],
        data=fields,
        timeout=WAIT_S,
    )
    assert response.status_code == 200, response.text
    assert np.array_equal(in_page, pixels(base64.b64decode(response.json()["data"][0]["b64_json"])))
    # Kept where unpainted, pixel for pixel; repainted where painted.
    assert np.array_equal(in_page[:, 16:], source[:, 16:])
    assert not np.array_equal(in_page[:, :16], source[:, :16])
    assert "seed 1" in browser.find_element(By.CSS_SELECTOR, "#result-images figcaption").text

    save_screenshot(browser, "playground-edit.png", tmp_path)

    # Cleared, the mask is no longer sent: the edit is image-to-image.
    browser.find_element(By.ID, "mask-clear").click()
    assert browser.execute_async_script("maskBlob().then((blob) => arguments[0](blob === null))") is True
    assert browser.find_element(By.ID, "strength").get_attribute("placeholder") == "default 0.6"

    # A picked file replaces the picture, its mask starts empty, and a type the server does not read goes as PNG.
    gif = tmp_path / "wide.gif"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(gif)
    browser.find_element(By.ID, "source-file").send_keys(str(gif))
    wait_for(
        browser, lambda d: d.find_element(By.ID, "source-info").text.startswith("48×40"), "the picked file"
    )
    assert browser.execute_script("return [editor.blob.type, editor.name, hasMask()]") == [
        "image/png",
        "wide.png",
        False,
    ]
    # So does a file dropped on the page.
    browser.execute_script(
        """
        const canvas = document.createElement("canvas");
        canvas.width = 24;
        canvas.height = 16;
        canvas.toBlob((blob) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], "dropped.png", { type: "image/png" }));
          document.getElementById("prompt").dispatchEvent(
            new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
        });
        """
    )
    wait_for(
        browser, lambda d: d.find_element(By.ID, "source-info").text.startswith("24×16"), "the dropped file"
    )
    assert browser.execute_script("return editor.name") == "dropped.png"

    requests += network_log(browser)
    check_only_same_origin(requests, server.base_url)
    assert console_errors(browser) == []
