"""The playground's history in headless Chromium: every image is kept in IndexedDB with all that made it, shown
again after a reload, made again byte for byte by "re-run" (an edit with its picture and mask), downloaded with its
parameters, deleted one at a time or cleared; where IndexedDB is refused the gallery still holds the page's
images and says the history is off."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from tests.e2e.test_playground import (
    EDITS,
    GENERATIONS,
    RECORD_FORMS,
    check_only_same_origin,
    chromium,
    console_errors,
    downloaded,
    needs_chromium,
    network_log,
    open_and_fill,
    paint_left_half,
    pixels,
    result_images,
    save_screenshot,
    status,
    wait_for,
)
from tests.helpers import ServerHandle

pytestmark = [pytest.mark.e2e, needs_chromium]

MODEL = "digits-xl-bs8"  # the session server's model: MODEL_BATCH=8, the default tier
# Every stored entry, newest first, its blobs as base64 (null where absent).
READ_HISTORY = """
const done = arguments[arguments.length - 1];
const b64 = async (blob) => {
  if (!blob) return null;
  const bytes = new Uint8Array(await blob.arrayBuffer());
  return btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
};
archive.ready
  .then(() => historyAll())
  .then((entries) => Promise.all(entries.map(async (entry) => ({
    ...entry, image: await b64(entry.image), source: await b64(entry.source), mask: await b64(entry.mask),
  }))))
  .then(done, (error) => done({ error: String(error) }));
"""
# What some private windows do: IndexedDB is there, and refuses to open.
REFUSE_INDEXEDDB = """
IDBFactory.prototype.open = function () {
  throw new DOMException("The user denied permission to access the database.", "SecurityError");
};
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path) as driver:
        yield driver


def stored(driver: WebDriver) -> list[dict[str, Any]]:
    entries = driver.execute_async_script(READ_HISTORY)
    assert isinstance(entries, list), entries
    return entries


def stored_cards(driver: WebDriver, count: int) -> list[Any]:
    """The gallery's cards once `count` of them are stored (a stored card carries its entry's id)."""

    def ready(d: WebDriver) -> list[Any] | bool:
        cards = d.find_elements(By.CSS_SELECTOR, "#gallery .card")
        return cards if len(cards) == count and all(c.get_attribute("data-id") for c in cards) else False

    return list(wait_for(driver, ready, f"{count} stored image(s) in the gallery", 30))


def card_of(driver: WebDriver, entry: dict[str, Any]) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'#gallery .card[data-id="{entry["id"]}"]')


def click(card: Any, action: str) -> None:
    card.find_element(By.CSS_SELECTOR, f"button.{action}").click()


def reload(driver: WebDriver) -> None:
    driver.refresh()
    wait_for(driver, lambda d: status(d) == "ready", "the page to read the model again", 30)
    driver.execute_async_script("archive.ready.then(() => arguments[0]())")


def posted(driver: WebDriver) -> list[dict[str, Any]]:
    """The JSON bodies the page posted to the generations route since the network log was last read."""
    requests = network_log(driver)
    return [
        json.loads(r["postData"])
        for r in requests
        if r["method"] == "POST" and r["url"].endswith(GENERATIONS)
    ]


def pixels_rgba(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGBA"))


def set_field(driver: WebDriver, field: str, value: str) -> None:
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def test_history_survives_a_reload_and_reruns_the_same_image(
    server: ServerHandle, browser: WebDriver, tmp_path: Path
) -> None:
    open_and_fill(browser, server, "", prompt="the digit 4", seed=11)
    set_field(browser, "steps", "3")
    network_log(browser)  # only what follows
    browser.find_element(By.ID, "generate").click()
    result_images(browser, 1)
    stored_cards(browser, 1)
    [sent] = posted(browser)
    assert sent == {
        "model": MODEL,
        "prompt": "the digit 4",
        "n": 1,
        "output_format": "png",
        "response_format": "b64_json",
        "num_inference_steps": 3,
        "seed": 11,
    }
    [first] = stored(browser)
    # The body that makes this very image again (the seed as its digits), and what the server answered.
    assert first["params"] == {**sent, "seed": "11"}
    assert first["kind"] == "generate"
    assert first["batch"] == {"n": 1, "index": 0, "seed": "11"}
    assert first["answer"] == {
        "model": MODEL,
        "size": "32x32",
        "quality": "auto",
        "output_format": "png",
        "tier": "xl",
    }
    assert first["defaults"] == {
        "steps": 4,
        "guidance": browser.execute_script("return state.card.default_guidance"),
    }
    assert first["timing"]["round trip (browser)"] > 0 and "server-timing: denoise" in first["timing"]
    assert first["timing"]["x-model"] == MODEL and first["timing"]["x-batch-size"] == "1"
    assert first["source"] is None and first["mask"] is None
    in_page = downloaded(
        browser, browser.find_element(By.CSS_SELECTOR, "#result-images .card"), tmp_path / "downloads"
    )
    assert base64.b64decode(first["image"]) == in_page  # the blob kept is the image shown
    assert pixels(base64.b64decode(first["image"])).std() > 10

    # After a reload the gallery is the history: the image with its parameters.
    reload(browser)
    [card] = stored_cards(browser, 1)
    assert browser.find_element(By.ID, "gallery-title").text == "History"
    assert "the last 200" in browser.find_element(By.ID, "gallery-hint").text
    assert not browser.find_element(By.ID, "history-note").is_displayed()
    assert card.find_element(By.CSS_SELECTOR, ".prompt").text == "the digit 4"
    summary = card.find_element(By.CSS_SELECTOR, ".summary").text
    for part in (MODEL, "32x32", "3 steps", "seed 11", "png"):
        assert part in summary, summary
    assert card.find_element(By.CSS_SELECTOR, "img").get_attribute("src").startswith("blob:")

    # Re-run: the form gets every parameter, the page posts the same body, and the same image comes back.
    set_field(browser, "prompt", "something else")
    network_log(browser)
    click(card, "rerun")
    stored_cards(browser, 2)
    assert posted(browser) == [sent]
    newest, oldest = stored(browser)
    assert oldest["id"] == first["id"] and newest["id"] != first["id"]
    assert newest["created"] > oldest["created"]
    for key in ("kind", "params", "batch", "answer", "defaults"):
        assert newest[key] == first[key], key
    assert newest["image"] == first["image"]
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "the digit 4"
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "3"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "11"
    assert "seed 11" in browser.find_element(By.CSS_SELECTOR, "#result-images figcaption").text
    # Newest first, in the page as in the store.
    ids = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, "#gallery .card")]
    assert ids == [str(newest["id"]), str(first["id"])]
    assert console_errors(browser) == []
    save_screenshot(browser, "playground-history.png", tmp_path)


def test_history_keeps_each_image_of_a_batch_with_its_own_seed(
    server: ServerHandle, browser: WebDriver
) -> None:
    open_and_fill(browser, server, "", prompt="the digit 9", seed=20)
    set_field(browser, "n", "2")
    Select(browser.find_element(By.ID, "size")).select_by_value("1:1")
    browser.find_element(By.ID, "generate").click()
    stored_cards(browser, 2)
    first, second = stored(browser)
    assert [first["params"]["seed"], second["params"]["seed"]] == ["20", "21"]
    assert [first["batch"], second["batch"]] == [{"n": 2, "index": i, "seed": "20"} for i in (0, 1)]
    assert second["params"]["n"] == 1 and second["params"]["aspect_ratio"] == "1:1"
    assert "image 2 of 2" in card_of(browser, second).find_element(By.CSS_SELECTOR, ".summary").text

    # "load" fills the form with the second image's own parameters, and sends nothing.
    set_field(browser, "prompt", "x")
    Select(browser.find_element(By.ID, "size")).select_by_value("")
    network_log(browser)
    click(card_of(browser, second), "load")
    values = {
        f: browser.find_element(By.ID, f).get_attribute("value") for f in ("prompt", "seed", "n", "size")
    }
    assert values == {"prompt": "the digit 9", "seed": "21", "n": "1", "size": "1:1"}
    assert posted(browser) == []

    # Its re-run alone gives the very image it was in its batch.
    click(card_of(browser, second), "rerun")
    stored_cards(browser, 3)
    [sent] = posted(browser)
    assert sent == {**second["params"], "seed": 21}
    rerun = stored(browser)[0]
    assert rerun["params"] == second["params"] and rerun["batch"] == {"n": 1, "index": 0, "seed": "21"}
    assert rerun["image"] == second["image"] != first["image"]


def test_history_downloads_an_image_and_its_parameters(
    server: ServerHandle, browser: WebDriver, tmp_path: Path
) -> None:
    open_and_fill(browser, server, "", prompt="The digit 6!", seed=5)
    network_log(browser)
    browser.find_element(By.ID, "generate").click()
    [card] = stored_cards(browser, 1)
    [sent] = posted(browser)
    [entry] = stored(browser)
    link = card.find_element(By.CSS_SELECTOR, "a[download]")
    assert link.get_attribute("download") == "diffuserve-the-digit-6-5.png"
    image = downloaded(browser, card, tmp_path / "downloads")
    assert image == base64.b64decode(entry["image"])

    click(card, "params")
    target = tmp_path / "downloads" / "diffuserve-the-digit-6-5.json"
    wait_for(browser, lambda _: target.exists() and target.stat().st_size > 0, "the parameters' download", 30)
    saved = json.loads(target.read_text())
    # A body to post again as it is: the seed a number, as the page sent it.
    assert saved["params"] == sent and saved["params"]["seed"] == 5
    assert saved["endpoint"] == "/v1/images/generations" and saved["kind"] == "generate"
    assert saved["batch"] == {"n": 1, "index": 0, "seed": 5}
    assert saved["answer"]["size"] == "32x32" and saved["answer"]["model"] == MODEL
    assert saved["timing"]["x-model"] == MODEL
    assert saved["created"].endswith("Z")
    assert not {"image", "source", "mask", "id"} & set(saved)


def test_history_deletes_one_image_and_clears_them_all(server: ServerHandle, browser: WebDriver) -> None:
    open_and_fill(browser, server, "", prompt="the digit 1", seed=1)
    set_field(browser, "n", "3")
    browser.find_element(By.ID, "generate").click()
    stored_cards(browser, 3)
    one, two, three = stored(browser)
    assert browser.find_element(By.ID, "gallery-count").text == "(3)"

    click(card_of(browser, two), "delete")
    stored_cards(browser, 2)
    assert [e["id"] for e in stored(browser)] == [one["id"], three["id"]]
    reload(browser)
    cards = stored_cards(browser, 2)
    assert [c.get_attribute("data-id") for c in cards] == [str(one["id"]), str(three["id"])]
    assert [e["params"]["seed"] for e in stored(browser)] == ["1", "3"]

    # Clearing takes a second click; the first only asks.
    clear = browser.find_element(By.ID, "clear-gallery")
    assert clear.text == "clear history"
    clear.click()
    assert clear.text == "click again to clear it all"
    assert len(stored(browser)) == 2
    clear.click()
    wait_for(
        browser, lambda d: not d.find_element(By.ID, "gallery-box").is_displayed(), "the gallery to go", 10
    )
    assert stored(browser) == []
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery .card") == []
    reload(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "#gallery .card") == []
    assert not browser.find_element(By.ID, "gallery-box").is_displayed()
    assert console_errors(browser) == []


def test_history_reruns_an_edit_with_its_picture_and_mask(server: ServerHandle, browser: WebDriver) -> None:
    open_and_fill(browser, server, RECORD_FORMS, prompt="the digit 3", seed=0)
    browser.find_element(By.ID, "generate").click()
    result_images(browser, 1)
    browser.find_element(By.CSS_SELECTOR, "#result-images .edit-this").click()
    wait_for(
        browser, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), "the picture to edit", 30
    )
    paint_left_half(browser)
    for field, value in (("prompt", "the digit 8"), ("seed", "1"), ("strength", "1.0")):
        set_field(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    stored_cards(browser, 2)
    edit, picture = stored(browser)
    assert edit["kind"] == "edit" and picture["kind"] == "generate"
    assert edit["params"] == {
        "model": MODEL,
        "prompt": "the digit 8",
        "n": 1,
        "output_format": "png",
        "response_format": "b64_json",
        "strength": 1,
        "seed": "1",
    }
    assert edit["source"] == picture["image"] and edit["source_name"] == "diffuserve-the-digit-3-0.png"
    assert edit["mask"] is not None
    assert (
        "edit with mask, strength 1" in card_of(browser, edit).find_element(By.CSS_SELECTOR, ".summary").text
    )
    [first_form] = browser.execute_script("return window.sentForms")

    # After a reload, in generate mode with other values, its re-run sends the same picture, mask and fields.
    reload(browser)
    browser.execute_script(RECORD_FORMS)
    set_field(browser, "prompt", "the digit 0")
    click(card_of(browser, edit), "rerun")
    stored_cards(browser, 3)
    assert browser.find_element(By.ID, "generate").text == "Edit"
    [form] = browser.execute_script("return window.sentForms")
    assert form["url"] == EDITS.lstrip("/")
    fields, first_fields = dict(form["fields"]), dict(first_form["fields"])
    assert sorted(fields) == sorted(first_fields)  # the picture and its mask too
    for name in ("image", "mask"):
        sent, before = fields.pop(name), first_fields.pop(name)
        assert (sent["filename"], sent["type"]) == (before["filename"], before["type"])
        assert np.array_equal(
            pixels_rgba(base64.b64decode(sent["b64"])), pixels_rgba(base64.b64decode(before["b64"]))
        ), name
    assert fields == first_fields
    rerun = stored(browser)[0]
    assert rerun["params"] == edit["params"] and rerun["image"] == edit["image"]
    check_only_same_origin(network_log(browser), server.base_url)
    assert console_errors(browser) == []


def test_gallery_works_without_history_where_indexeddb_is_refused(
    server: ServerHandle, browser: WebDriver
) -> None:
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": REFUSE_INDEXEDDB})
    open_and_fill(browser, server, "", prompt="the digit 2", seed=4)
    note = browser.find_element(By.ID, "history-note")
    wait_for(browser, lambda _: note.is_displayed(), "the note that history is off", 10)
    assert "History is off" in note.text and "reloaded" in note.text
    assert browser.find_element(By.ID, "gallery-title").text == "This session"
    browser.find_element(By.ID, "generate").click()
    result_images(browser, 1)
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 1, "the image", 30)
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert card.get_attribute("data-id") is None
    assert "seed 4" in card.find_element(By.CSS_SELECTOR, ".summary").text
    assert stored(browser) == []
    # The session's gallery still works: "load" fills the form, "delete" removes the image.
    set_field(browser, "seed", "")
    click(card, "load")
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "4"
    click(card, "delete")
    wait_for(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#gallery .card"), "the image to go", 10)
    assert console_errors(browser) == []


# Fills the history to its bound with made-up entries of one tiny picture, oldest first.
FILL_HISTORY = """
const done = arguments[arguments.length - 1];
const canvas = document.createElement("canvas");
canvas.width = canvas.height = 8;
canvas.toBlob(async (image) => {
  const entries = Array.from({ length: HISTORY_MAX }, (_, i) => ({
    created: 1700000000000 + i, kind: "generate",
    params: { model: "old", prompt: `old ${i}`, n: 1, output_format: "png", response_format: "b64_json",
              seed: String(i) },
    batch: { n: 1, index: 0, seed: String(i) },
    answer: { model: "old", size: "8x8", quality: "auto", output_format: "png", tier: null },
    defaults: { steps: null, guidance: null }, timing: null, image,
  }));
  await archive.ready;
  await historyAdd(entries);
  done(HISTORY_MAX);
}, "image/png");
"""


def test_history_keeps_the_newest_and_evicts_the_oldest(server: ServerHandle, browser: WebDriver) -> None:
    open_and_fill(browser, server, "", prompt="the digit 7", seed=2)
    bound = browser.execute_async_script(FILL_HISTORY)
    assert bound == 200
    reload(browser)
    cards = stored_cards(browser, bound)
    assert cards[0].find_element(By.CSS_SELECTOR, ".prompt").text == "old 199"
    assert cards[-1].find_element(By.CSS_SELECTOR, ".prompt").text == "old 0"
    assert browser.find_element(By.ID, "gallery-count").text == "(200)"

    set_field(browser, "prompt", "the digit 7")
    set_field(browser, "seed", "2")
    browser.find_element(By.ID, "generate").click()
    wait_for(
        browser,
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#gallery .card .prompt").text == "the digit 7"
            and d.find_elements(By.CSS_SELECTOR, "#gallery .card")[-1].text.startswith("old 1")
        ),
        "the new image in and the oldest out",
        30,
    )
    stored_cards(browser, bound)
    entries = stored(browser)
    assert len(entries) == bound
    assert [e["params"]["prompt"] for e in entries[:2]] == ["the digit 7", "old 199"]
    assert entries[-1]["params"]["prompt"] == "old 1"
    assert console_errors(browser) == []
