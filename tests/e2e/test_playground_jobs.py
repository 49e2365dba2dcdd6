"""The playground's jobs in headless Chromium: the form sent as a job (`POST /v1/images/jobs`) is polled until it
ends, its image is the API's own and joins the history like any other, an edit's too (its picture and mask as data
URLs); a queued and a running job are cancelled from the page; a job that fails shows the server's error; a keyed
server gets the key with every job request."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select

from tests.e2e.test_playground import (
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
from tests.e2e.test_playground_history import set_field, stored, stored_cards
from tests.helpers import ServerHandle, start_server

pytestmark = [pytest.mark.e2e, needs_chromium]

MODEL = "digits-xl-bs8"  # the session server's model
JOBS = "/v1/images/jobs"
KEY = "sk-playground-jobs-key"
# Every status text each job row showed, in order (a row's id → its texts).
RECORD_JOB_STATUSES = """
window.jobStatuses = {};
new MutationObserver((records) => {
  for (const record of records) {
    const node = record.target.nodeType === 1 ? record.target : record.target.parentElement;
    const row = node && node.closest(".job");
    if (!row || !row.dataset.status) continue;
    const seen = (window.jobStatuses[row.dataset.id] ||= []);
    const text = row.querySelector(".job-status").textContent;
    if (seen[seen.length - 1] !== text) seen.push(text);
  }
}).observe(document.getElementById("jobs"),
           { subtree: true, childList: true, attributes: true, characterData: true });
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    with chromium(tmp_path) as driver:
        yield driver


def job_rows(driver: WebDriver) -> list[Any]:
    """The jobs panel's rows, newest first."""
    return list(driver.find_elements(By.CSS_SELECTOR, "#jobs .job"))


def row_status(row: Any) -> str:
    return str(row.find_element(By.CSS_SELECTOR, ".job-status").text)


def wait_status(driver: WebDriver, job_id: str, state: str, timeout: float = 60) -> Any:
    """The job's row once its data-status is `state`."""

    def reached(d: WebDriver) -> Any:
        rows = d.find_elements(By.CSS_SELECTOR, f'#jobs .job[data-id="{job_id}"][data-status="{state}"]')
        return rows[0] if rows else False

    return wait_for(driver, reached, f"job {job_id} {state}", timeout)


def submit_job(driver: WebDriver, count_before: int) -> str:
    """Clicks "Submit as job"; the new job's id once its row is in the panel."""
    driver.find_element(By.ID, "submit-job").click()
    wait_for(driver, lambda d: len(job_rows(d)) == count_before + 1, "the job's row", 30)
    return str(job_rows(driver)[0].get_attribute("data-id"))


def job_posts(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in requests if r["method"] == "POST" and r["url"].endswith(JOBS)]


def polls_of(requests: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [r for r in requests if r["method"] == "GET" and r["url"].endswith(f"{JOBS}/{job_id}")]


def fill_long_job(driver: WebDriver) -> None:
    """A job that runs for a minute or more on CPU: 10 images of the model's largest size (256×256) at its most
    steps (200); the tests cancel it, or let it fail, long before."""
    Select(driver.find_element(By.ID, "size")).select_by_value("custom")
    for field, value in (("width", "256"), ("height", "256"), ("steps", "200"), ("n", "10")):
        set_field(driver, field, value)


def test_a_job_from_the_page_gives_the_apis_image_and_joins_the_history(
    server: ServerHandle, browser: WebDriver, tmp_path: Path
) -> None:
    open_and_fill(browser, server, RECORD_JOB_STATUSES, prompt="the digit 6", seed=9)
    set_field(browser, "steps", "3")
    Select(browser.find_element(By.ID, "priority")).select_by_value("interactive")
    assert not browser.find_element(By.ID, "jobs-box").is_displayed()
    network_log(browser)  # only what follows
    job_id = submit_job(browser, 0)
    row = wait_status(browser, job_id, "succeeded")
    [card] = stored_cards(browser, 1)
    requests = network_log(browser)

    # The form's body as JSON, with the priority picked; the job polled until it ended, then no more.
    [post] = job_posts(requests)
    sent = json.loads(post["postData"])
    assert sent == {
        "model": MODEL,
        "prompt": "the digit 6",
        "n": 1,
        "output_format": "png",
        "response_format": "b64_json",
        "num_inference_steps": 3,
        "priority": "interactive",
        "seed": 9,
    }
    assert polls_of(requests, job_id)
    seen = browser.execute_script("return window.jobStatuses")[job_id]
    assert seen[0].startswith("queued") and seen[-1].startswith("succeeded in "), seen
    time.sleep(1.2)  # three poll periods
    assert polls_of(network_log(browser), job_id) == []
    assert browser.find_element(By.ID, "jobs-count").text == "(1)"
    assert not row.find_element(By.CSS_SELECTOR, ".job-cancel").is_displayed()
    assert not row.find_element(By.CSS_SELECTOR, "progress").is_displayed()
    assert job_id in row.find_element(By.CSS_SELECTOR, ".job-meta").text
    assert "interactive" in row.find_element(By.CSS_SELECTOR, ".job-meta").text

    # The job's own result over HTTP, the history's blob and the gallery's download: the same bytes, which are
    # those of the synchronous route for the same body.
    job = httpx.get(f"{server.base_url}{JOBS}/{job_id}", timeout=30).json()
    assert job["status"] == "succeeded" and job["priority"] == "interactive"
    from_job = base64.b64decode(job["result"]["data"][0]["b64_json"])
    [entry] = stored(browser)
    assert base64.b64decode(entry["image"]) == from_job
    assert downloaded(browser, card, tmp_path / "downloads") == from_job
    body = {key: value for key, value in sent.items() if key != "priority"}
    synchronous = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=120)
    assert synchronous.status_code == 200, synchronous.text
    assert base64.b64decode(synchronous.json()["data"][0]["b64_json"]) == from_job
    assert pixels(from_job).std() > 10  # not blank

    # Kept like a synchronous image: the body that makes it again (no priority), and the job's times.
    assert entry["kind"] == "generate"
    assert entry["params"] == {**body, "seed": "9"}
    assert entry["batch"] == {"n": 1, "index": 0, "seed": "9"}
    assert entry["answer"]["model"] == MODEL and entry["answer"]["size"] == "32x32"
    assert entry["timing"]["job id"] == job_id and entry["timing"]["job ran (server)"] > 0
    assert "seed 9" in card.find_element(By.CSS_SELECTOR, ".summary").text
    assert browser.find_element(By.ID, "seed-reuse").is_enabled()

    # Its thumbnail shows the image in the result panel, with the job's times.
    thumb = row.find_element(By.CSS_SELECTOR, ".job-show img")
    assert browser.execute_script("return arguments[0].naturalWidth", thumb) == 32
    row.find_element(By.CSS_SELECTOR, ".job-show").click()
    result_images(browser, 1)
    assert "seed 9" in browser.find_element(By.CSS_SELECTOR, "#result-images figcaption").text
    timing = browser.find_element(By.ID, "timing").text
    assert "job queued (server)" in timing and "job ran (server)" in timing and MODEL in timing

    # "clear finished" empties the panel; the image stays in the gallery.
    browser.find_element(By.ID, "clear-jobs").click()
    assert job_rows(browser) == [] and not browser.find_element(By.ID, "jobs-box").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .card")) == 1
    check_only_same_origin(requests, server.base_url)
    assert console_errors(browser) == []


def data_url_bytes(url: str, kind: str) -> bytes:
    prefix = f"data:{kind};base64,"
    assert url.startswith(prefix), url[:40]
    return base64.b64decode(url[len(prefix) :])


def test_an_edit_as_a_job_sends_its_picture_and_mask_as_data_urls(
    server: ServerHandle, browser: WebDriver
) -> None:
    open_and_fill(browser, server, "", prompt="the digit 3", seed=0)
    browser.find_element(By.ID, "generate").click()
    result_images(browser, 1)
    browser.find_element(By.CSS_SELECTOR, "#result-images .edit-this").click()
    wait_for(
        browser, lambda d: d.find_element(By.ID, "mask-canvas").is_displayed(), "the picture to edit", 30
    )
    paint_left_half(browser)
    for field, value in (("prompt", "the digit 8"), ("seed", "1"), ("strength", "1.0")):
        set_field(browser, field, value)
    network_log(browser)
    job_id = submit_job(browser, 0)
    wait_status(browser, job_id, "succeeded")
    stored_cards(browser, 2)
    [post] = job_posts(network_log(browser))
    sent = json.loads(post["postData"])
    images, mask = sent.pop("images"), sent.pop("mask")
    assert sent == {
        "model": MODEL,
        "prompt": "the digit 8",
        "n": 1,
        "output_format": "png",
        "response_format": "b64_json",
        "strength": 1,
        "priority": "batch",
        "operation": "edits",
        "seed": 1,
    }
    edit, picture = stored(browser)
    [image] = images
    source = data_url_bytes(image["image_url"], "image/png")
    mask_png = data_url_bytes(mask["image_url"], "image/png")
    # The history keeps it as any edit: its picture (the generated image) and mask, its synchronous body.
    assert edit["kind"] == "edit" and base64.b64decode(edit["source"]) == source
    assert source == base64.b64decode(picture["image"])
    assert base64.b64decode(edit["mask"]) == mask_png
    assert edit["params"] == {
        key: value for key, value in sent.items() if key not in ("priority", "operation")
    } | {"seed": "1"}

    # The job's image is the synchronous edit's for the same picture, mask and fields.
    job = httpx.get(f"{server.base_url}{JOBS}/{job_id}", timeout=30).json()
    assert job["operation"] == "edits" and job["status"] == "succeeded"
    from_job = base64.b64decode(job["result"]["data"][0]["b64_json"])
    assert base64.b64decode(edit["image"]) == from_job
    fields = {key: str(value) for key, value in sent.items() if key not in ("priority", "operation")}
    response = httpx.post(
        f"{server.base_url}/v1/images/edits",
        files=[
            ("image", ("picture.png", source, "image/png")),
            ("mask", ("mask.png", mask_png, "image/png")),
        ],
        data=fields,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert base64.b64decode(response.json()["data"][0]["b64_json"]) == from_job
    assert pixels(from_job)[:, 16:].tolist() == pixels(source)[:, 16:].tolist()  # kept where unpainted
    assert (
        "edit with mask, strength 1" in browser.find_element(By.CSS_SELECTOR, "#gallery .card .summary").text
    )
    assert console_errors(browser) == []


def test_queued_and_running_jobs_show_their_progress_and_are_cancelled(
    server: ServerHandle, browser: WebDriver, tmp_path: Path
) -> None:
    open_and_fill(browser, server, RECORD_JOB_STATUSES, prompt="the digit 8", seed=1)
    fill_long_job(browser)
    ids: list[str] = []
    try:
        ids.append(submit_job(browser, 0))
        running = wait_status(browser, ids[0], "running", 30)
        bar = running.find_element(By.CSS_SELECTOR, "progress")
        wait_for(browser, lambda d: int(bar.get_attribute("value")) > 0, "a step done", 30)
        assert bar.is_displayed() and bar.get_attribute("max") == "200"
        assert re.fullmatch(r"running, step \d+/200", row_status(running)), row_status(running)
        # A second job waits behind the first: queued, with its place in line.
        ids.append(submit_job(browser, 1))
        queued = wait_status(browser, ids[1], "queued", 10)
        assert re.fullmatch(r"queued, (next|\d+ ahead)", row_status(queued)), row_status(queued)
        assert browser.find_element(By.ID, "jobs-count").text == "(2, 2 unfinished)"
        save_screenshot(browser, "playground-jobs.png", tmp_path)

        network_log(browser)
        queued.find_element(By.CSS_SELECTOR, ".job-cancel").click()
        wait_status(browser, ids[1], "cancelled", 10)
        running.find_element(By.CSS_SELECTOR, ".job-cancel").click()
        wait_status(browser, ids[0], "cancelled", 10)
        deletes = [r["url"] for r in network_log(browser) if r["method"] == "DELETE"]
        assert deletes == [f"{server.base_url}{JOBS}/{ids[1]}", f"{server.base_url}{JOBS}/{ids[0]}"]

        # The server says so too; nothing joined the gallery, and the page polls the jobs no more.
        for job_id in ids:
            job = httpx.get(f"{server.base_url}{JOBS}/{job_id}", timeout=30).json()
            assert job["status"] == "cancelled" and "result" not in job, job
        seen = browser.execute_script("return window.jobStatuses")
        assert seen[ids[0]][-1] == seen[ids[1]][-1] == "cancelled", seen
        assert any(text.startswith("running, step") for text in seen[ids[0]]), seen
        for row in (running, queued):
            assert not row.find_element(By.CSS_SELECTOR, ".job-cancel").is_displayed()
            assert not row.find_element(By.CSS_SELECTOR, "progress").is_displayed()
        assert browser.find_element(By.ID, "jobs-count").text == "(2)"
        time.sleep(1.2)
        requests = network_log(browser)
        assert polls_of(requests, ids[0]) == polls_of(requests, ids[1]) == []
        assert browser.find_elements(By.CSS_SELECTOR, "#gallery .card") == []
        assert console_errors(browser) == []
    finally:
        for job_id in ids:  # never leave the session's server busy with them
            httpx.delete(f"{server.base_url}{JOBS}/{job_id}", timeout=30)


def test_a_failed_job_shows_the_servers_error_and_the_key_goes_with_every_job_call(
    browser: WebDriver, tmp_path: Path
) -> None:
    """A keyed server whose jobs fail past 1 s: the page sends the key to every jobs route, shows the failure
    as the server wrote it, and a body the server refuses is not a job at all."""
    with start_server(API_KEYS=KEY, JOB_TIMEOUT="1", IMAGE_STORE_DIR=str(tmp_path / "store")) as server:
        browser.get(f"{server.base_url}/")
        wait_for(browser, lambda d: status(d) == "locked", "the page to ask for a key", 60)
        browser.find_element(By.ID, "api-key").send_keys(KEY + "\t")
        wait_for(browser, lambda d: status(d) == "ready", "the page to accept the key", 60)
        browser.execute_script(RECORD_JOB_STATUSES)
        set_field(browser, "prompt", "the digit 0")
        fill_long_job(browser)
        network_log(browser)
        job_id = submit_job(browser, 0)
        row = wait_status(browser, job_id, "failed", 60)
        note = row.find_element(By.CSS_SELECTOR, ".job-note")
        assert note.is_displayed() and "error" in str(note.get_attribute("class"))
        assert note.text.startswith("the request did not finish within"), note.text
        assert row_status(row) == "failed"
        job = httpx.get(
            f"{server.base_url}{JOBS}/{job_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        ).json()
        assert job["status"] == "failed" and job["error"]["message"] == note.text
        assert job["error"]["code"] == "deadline_exceeded" and job["error_status"] == 504

        # Refused at submission (past the model's most steps): an error, and no job.
        set_field(browser, "steps", "201")
        browser.find_element(By.ID, "submit-job").click()
        error = browser.find_element(By.ID, "error")
        wait_for(browser, lambda _: error.is_displayed(), "the refusal", 30)
        assert error.text == (
            "The job was not submitted. HTTP 400: num_inference_steps must be between 1 and 200, got 201 "
            "(field: num_inference_steps)"
        )
        assert len(job_rows(browser)) == 1
        assert browser.find_element(By.ID, "submit-job").is_enabled()

        requests = network_log(browser)
        calls = [r for r in requests if f"{JOBS}" in r["url"]]
        assert len(job_posts(calls)) == 2 and polls_of(calls, job_id)
        assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in calls), calls
        check_only_same_origin(requests, server.base_url)
        errors = console_errors(browser)
        # The expected console lines: the keyless /v1/models call that asked for the key, and the refused job.
        assert all(
            ("/v1/models" in e["message"] and "401" in e["message"]) or "400" in e["message"] for e in errors
        )
