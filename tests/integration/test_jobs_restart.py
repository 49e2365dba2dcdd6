"""JOBS_DB: jobs outlive the server, in a SQLite file or in PostgreSQL (a throwaway cluster of Debian's
postgresql package on a Unix socket). A job queued or running when the server stops runs again at the next
start (the same seed, so the same image); a finished job is still readable after it."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port
from tests.inprocess import digits_settings, served
from tests.integration.test_jobs import BODY, JOBS, LONG, finished, running

pytestmark = pytest.mark.asyncio


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own for the module, reached on a Unix socket: its URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server here (Debian's postgresql package; .ci/run installs it)")
    bindir = Path(found[-1]).parent
    # The server refuses to run as root: as root, it runs as the package's postgres user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="diffuserve-pg-"))
    root.chmod(0o755)
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    run = lambda *argv: subprocess.run([*as_user, *map(str, argv)], check=True, capture_output=True)  # noqa: E731
    run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "diffuserve", "--no-sync")
    options = f"-k {root} -p {port} -c listen_addresses='' -c fsync=off"
    run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "log", "-w", "start")
    try:
        yield f"postgresql://diffuserve@/postgres?host={root}&port={port}"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite")
    return str(request.getfixturevalue("postgres"))


async def test_jobs_submitted_before_a_restart_are_answered_after_it(jobs_db: str) -> None:
    settings = digits_settings(jobs_db=jobs_db)
    async with served(settings) as app, client(app) as http:
        done = (await http.post(JOBS, json={**BODY, "seed": 21})).json()
        done_view = await finished(http, done["id"])
        interrupted = (await http.post(JOBS, json={**LONG, "seed": 22, "num_inference_steps": 40})).json()
        await running(http, interrupted["id"], step=2)
        # No seed given: the one drawn at submission is kept, so the run after the restart paints the same.
        waiting = (await http.post(JOBS, json={**BODY, "num_inference_steps": 10})).json()
        assert (await http.get(f"{JOBS}/{waiting['id']}")).json()["status"] == "queued"

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
