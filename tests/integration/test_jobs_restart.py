"""JOBS_DB: jobs outlive the server. A job queued or running when the server stops runs again at the next start
(the same seed, so the same image); a finished job is still readable after it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.inprocess import digits_settings, served
from tests.integration.test_jobs import BODY, JOBS, LONG, finished, running

pytestmark = pytest.mark.asyncio


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)


async def test_jobs_submitted_before_a_restart_are_answered_after_it(tmp_path: Path) -> None:
    settings = digits_settings(jobs_db=str(tmp_path / "jobs.sqlite"))
    async with served(settings) as app, client(app) as http:
        done = (await http.post(JOBS, json={**BODY, "seed": 21})).json()
        done_view = await finished(http, done["id"])
        interrupted = (await http.post(JOBS, json={**LONG, "seed": 22, "num_inference_steps": 40})).json()
        await running(http, interrupted["id"], step=2)
        # No seed given: the one drawn at submission is kept, so the run after the restart paints the same.
        waiting = (await http.post(JOBS, json={**BODY, "num_inference_steps": 10})).json()
        assert (await http.get(f"{JOBS}/{waiting['id']}")).json()["status"] == "queued"
    assert (tmp_path / "jobs.sqlite").stat().st_size > 0

    async with served(settings) as app, client(app) as http:
        again = (await http.get(f"{JOBS}/{done['id']}")).json()
        assert again["status"] == "succeeded" and again["result"] == done_view["result"]
        views = await asyncio.gather(*(finished(http, job["id"]) for job in (interrupted, waiting)))
        assert [view["status"] for view in views] == ["succeeded", "succeeded"], views
        assert views[0]["attempts"] == 2, "the run the restart cut short counts as an attempt"
        seed = views[1]["result"]["data"][0]["seed"]
        for view, body in (
            (views[0], {**LONG, "seed": 22, "num_inference_steps": 40}),
            (views[1], {**BODY, "seed": seed, "num_inference_steps": 10}),
        ):
            sync = await http.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
            assert view["result"]["data"][0]["b64_json"] == sync.json()["data"][0]["b64_json"]
        listed = (await http.get(JOBS)).json()["data"]
        assert {job["id"] for job in listed} == {done["id"], interrupted["id"], waiting["id"]}
