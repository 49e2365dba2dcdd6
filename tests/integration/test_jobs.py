"""`/v1/images/jobs` on the built-in digits model, served in process: a job answers what the synchronous request
answers, reports its queue position and steps, cancels at a step, survives a killed worker, and calls a signed
webhook once; bad jobs are refused naming their field."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from openai import AsyncOpenAI
from standardwebhooks.webhooks import Webhook

from tests.inprocess import digits_settings, envelope, sample, served, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
JOBS = "/v1/images/jobs"
BODY = {"prompt": "the digit 7", "output_format": "png"}
# Long enough to watch (about 0.1 s a step at this size on one CPU thread), far from the model's 200-step limit.
LONG = {**BODY, "size": "128x128", "num_inference_steps": 120}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[FastAPI]:
    settings = digits_settings(
        webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff_seconds=0.05
    )
    async with served(settings) as app:
        yield app


async def finished(http: httpx.AsyncClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """The job's view once it has ended, with every status seen on the way."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = (await http.get(f"{JOBS}/{job_id}")).json()
        seen.append(view)
        if view["status"] in ("succeeded", "failed", "cancelled"):
            view["seen"] = seen
            return dict(view)
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not end in {timeout} s; last seen {seen[-1]}")


async def running(http: httpx.AsyncClient, job_id: str, step: int = 2) -> dict[str, Any]:
    """The job's view once it has run `step` steps."""
    for _ in range(3000):
        view = (await http.get(f"{JOBS}/{job_id}")).json()
        if view["status"] == "running" and view["progress"]["step"] >= step:
            return dict(view)
        assert view["status"] in ("queued", "running"), view
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached step {step}")


async def test_a_job_answers_what_the_synchronous_request_answers(
    http: httpx.AsyncClient, client: AsyncOpenAI, app: FastAPI
) -> None:
    submitted = await http.post(JOBS, json={**BODY, "seed": 1234, "num_inference_steps": 12})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["status"] == "queued" and job["priority"] == "batch" and job["object"] == "image.job"
    assert submitted.headers["location"] == job["status_url"] == f"http://testserver{JOBS}/{job['id']}"
    view = await finished(http, job["id"])
    assert view["status"] == "succeeded", view
    steps = [v["progress"] for v in view["seen"] if v["status"] == "running"]
    assert steps and all(0 <= p["step"] <= p["steps"] == 12 for p in steps), view["seen"]
    sync = await client.images.generate(
        model="digits",
        prompt=BODY["prompt"],
        response_format="b64_json",
        extra_body={"seed": 1234, "num_inference_steps": 12, "output_format": "png"},
    )
    assert view["result"]["data"][0]["b64_json"] == sync.data[0].b64_json
    assert view["result"]["data"][0]["seed"] == 1234 and view["result"]["usage"]["output_tokens"] > 0
    assert view["attempts"] == 1 and view["finished_at"] >= view["started_at"] >= view["created_at"]
    listed = (await http.get(JOBS, params={"limit": 1})).json()
    assert listed["data"][0]["id"] == job["id"] and "result" not in listed["data"][0]
    assert sample(app, "diffuserve_jobs_finished_total", state="succeeded") >= 1


async def test_a_queued_job_shows_its_position_and_an_interactive_request_goes_first(
    http: httpx.AsyncClient,
) -> None:
    first = (await http.post(JOBS, json={**LONG, "seed": 1})).json()
    await running(http, first["id"], step=1)
    queued = [(await http.post(JOBS, json={**BODY, "seed": 10 + i})).json() for i in range(3)]
    positions = [(await http.get(f"{JOBS}/{job['id']}")).json()["queue_position"] for job in queued]
    assert positions == [0, 1, 2]
    started = time.monotonic()
    answer = await http.post(
        "/v1/images/generations", json={**BODY, "priority": "interactive", "response_format": "b64_json"}
    )
    assert answer.status_code == 200
    waited = time.monotonic() - started
    # The running job's batch was stopped for it (preemption): it did not wait for 120 steps.
    assert waited < 5.0, waited
    views = [await finished(http, job["id"]) for job in [first, *queued]]
    assert [v["status"] for v in views] == ["succeeded"] * 4
    assert views[0]["finished_at"] > started, "the preempted job ran again after the interactive request"


async def test_cancel_stops_a_running_job_at_its_next_step(http: httpx.AsyncClient, app: FastAPI) -> None:
    job = (await http.post(JOBS, json={**LONG, "seed": 5})).json()
    before = await running(http, job["id"], step=3)
    step_s = (time.time() - before["started_at"]) / before["progress"]["step"]
    scheduler = app.state.service.models[before["model"]].scheduler
    cancelled_at = time.monotonic()
    answer = await http.delete(f"{JOBS}/{job['id']}")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    await until(lambda: not scheduler.in_flight, timeout=30)
    stopped_in = time.monotonic() - cancelled_at
    # The worker stops at its next step boundary: about one step, far from the 100+ steps left.
    assert stopped_in < 3 * step_s + 0.5, (stopped_in, step_s)
    again = await http.delete(f"{JOBS}/{job['id']}")
    assert envelope(again, 409, "job_finished")["param"] == "job_id"
    assert (await http.get(f"{JOBS}/{job['id']}")).json()["status"] == "cancelled"


async def test_a_job_whose_worker_is_killed_runs_again_and_completes(
    http: httpx.AsyncClient, app: FastAPI
) -> None:
    job = (await http.post(JOBS, json={**LONG, "seed": 77, "num_inference_steps": 30})).json()
    await running(http, job["id"], step=2)
    service = app.state.service
    (pid,) = [w["pid"] for w in service.describe_workers() if w["state"] == "busy"]
    os.kill(pid, signal.SIGKILL)
    view = await finished(http, job["id"])
    assert view["status"] == "succeeded" and view["attempts"] == 2, view
    sync = await http.post(
        "/v1/images/generations",
        json={**LONG, "seed": 77, "num_inference_steps": 30, "response_format": "b64_json"},
    )
    assert view["result"]["data"][0]["b64_json"] == sync.json()["data"][0]["b64_json"]


async def test_bad_jobs_are_refused_naming_the_field(http: httpx.AsyncClient) -> None:
    cases = [
        ({**BODY, "stream": True}, "stream"),
        ({**BODY, "priority": "urgent"}, "priority"),
        ({**BODY, "operation": "variations"}, "operation"),
        ({**BODY, "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
        ({**BODY, "webhook_url": "http://user:pw@example.com/hook"}, "webhook_url"),
        ({**BODY, "n": 0}, "n"),
        ({**BODY, "operation": "edits"}, "images"),
    ]
    for body, param in cases:
        answer = await http.post(JOBS, json=body)
        assert envelope(answer, 400, "invalid_value")["param"] == param, (body, answer.text)
    form = await http.post(JOBS, files={"image": ("a.png", b"x")}, data={"prompt": "x"})
    assert envelope(form, 415, "unsupported_media_type")["param"] == "Content-Type"
    missing = await http.get(f"{JOBS}/job_nope")
    assert envelope(missing, 404, "job_not_found")["param"] == "job_id"
    assert envelope(await http.delete(f"{JOBS}/job_nope"), 404, "job_not_found")
    assert envelope(await http.get(JOBS, params={"limit": 0}), 400, "invalid_value")["param"] == "limit"


class Receiver:
    """A webhook receiver on loopback: answers 500 to the first `fail_first` deliveries, then 200."""

    def __init__(self, fail_first: int) -> None:
        self.deliveries: list[tuple[int, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.deliveries) < fail_first else 200
                receiver.deliveries.append((status, dict(self.headers.items()), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/diffuserve?x=1"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(fail_first=2) as receiver:
        yield receiver


async def test_a_webhook_is_signed_retried_on_500_and_delivered_once(
    http: httpx.AsyncClient, app: FastAPI, receiver: Receiver
) -> None:
    job = (await http.post(JOBS, json={**BODY, "seed": 9, "webhook_url": receiver.url})).json()
    assert job["webhook"] == {"url": receiver.url, "state": None, "attempts": 0}
    await finished(http, job["id"])
    await until(lambda: len(receiver.deliveries) >= 3, timeout=30)
    # The receiver has the delivery a moment before the server has read its answer and recorded it.
    for _ in range(200):
        view = (await http.get(f"{JOBS}/{job['id']}")).json()
        if view["webhook"]["state"] in ("delivered", "failed"):
            break
        await asyncio.sleep(0.01)
    assert view["webhook"] == {"url": receiver.url, "state": "delivered", "attempts": 3}
    await asyncio.sleep(0.3)  # nothing more comes once it was delivered
    assert [status for status, _, _ in receiver.deliveries] == [500, 500, 200]
    ids = {headers["webhook-id"] for _, headers, _ in receiver.deliveries}
    assert ids == {f"msg_{job['id']}"}, "every retry carries the same id, so receivers can drop repeats"
    for _, headers, body in receiver.deliveries:
        payload = Webhook(SECRET).verify(body, headers)  # the Standard Webhooks reference check
        assert payload["type"] == "image.job.succeeded" and payload["data"]["id"] == job["id"]
        assert payload["data"]["result"]["data"][0]["seed"] == 9
    tampered = dict(receiver.deliveries[-1][1])
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook(SECRET).verify(receiver.deliveries[-1][2] + b" ", tampered)
    assert sample(app, "diffuserve_webhook_deliveries_total", outcome="retried") >= 2


async def test_a_streamed_request_can_follow_its_queue_position_and_steps(http: httpx.AsyncClient) -> None:
    body = {**BODY, "seed": 3, "num_inference_steps": 6, "stream": True, "progress": True}
    async with http.stream("POST", "/v1/images/generations", json=body) as answer:
        text = (await answer.aread()).decode()
    events = [block.split("\n")[0].removeprefix("event: ") for block in text.strip().split("\n\n")]
    steps = [line for line in text.splitlines() if '"status":"running"' in line]
    assert events[-1] == "image_generation.completed"
    assert "image_generation.progress" in events
    assert len(steps) == 6 and '"step":6,"steps":6' in steps[-1]


async def test_webhooks_to_loopback_are_refused_unless_allowed() -> None:
    async with (
        served(digits_settings(webhook_secret=SECRET)) as app,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http,
    ):
        for url in (
            "http://127.0.0.1:9/hook",
            "http://localhost/hook",
            "http://[::1]/hook",
            "http://10.1.2.3/",
        ):
            answer = await http.post(JOBS, json={**BODY, "webhook_url": url})
            assert envelope(answer, 400, "invalid_value")["param"] == "webhook_url", url
            assert "WEBHOOK_ALLOW_PRIVATE" in answer.json()["error"]["message"]


async def test_jobs_are_each_api_keys_own() -> None:
    async with (
        served(digits_settings(api_keys=["key-a", "key-b"])) as app,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http,
    ):
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        job = (await http.post(JOBS, json=BODY, headers=a)).json()
        assert (await http.get(f"{JOBS}/{job['id']}", headers=a)).status_code == 200
        envelope(await http.get(f"{JOBS}/{job['id']}", headers=b), 404, "job_not_found")
        envelope(await http.delete(f"{JOBS}/{job['id']}", headers=b), 404, "job_not_found")
        assert (await http.get(JOBS, headers=b)).json()["data"] == []
        envelope(await http.get(JOBS), 401, "invalid_api_key")


async def test_an_edit_job_answers_what_the_synchronous_edit_answers(http: httpx.AsyncClient) -> None:
    made = await http.post("/v1/images/generations", json={**BODY, "seed": 2, "response_format": "b64_json"})
    picture = {"image_url": "data:image/png;base64," + made.json()["data"][0]["b64_json"]}
    edit = {**BODY, "prompt": "the digit 8", "images": [picture], "strength": 0.6, "seed": 3}
    job = (await http.post(JOBS, json={**edit, "operation": "edits"})).json()
    assert job["operation"] == "edits", job
    view = await finished(http, job["id"])
    assert view["status"] == "succeeded", view
    sync = await http.post("/v1/images/edits", json={**edit, "response_format": "b64_json"})
    assert view["result"]["data"][0]["b64_json"] == sync.json()["data"][0]["b64_json"]
