"""What a new user meets first: `serve digits` says once, in one line, where the API and the playground are; a
taken port is one line naming PORT; `/health`, `/version` and `/docs` answer as vLLM's do; a reader that leaves
early (`| head`) gets no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from diffuserve.cli import main
from tests.helpers import free_port, server_free_env, start_server
from tests.inprocess import URL, client_of, digits_settings, served


def test_serve_digits_logs_one_ready_line_with_both_urls() -> None:
    with start_server(["digits"]) as server:
        port = server.base_url.rsplit(":", 1)[1]
        wanted = f"ready: API http://127.0.0.1:{port}/v1 · playground http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 10
        while wanted not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log_path.read_text()
        assert [line for line in log.splitlines() if "ready: " in line] == [
            line for line in log.splitlines() if line.endswith(wanted)
        ]
        assert log.count(wanted) == 1, log
        assert "a `ready:` line follows" in log

        health = httpx.get(f"{server.base_url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ready"
        version = httpx.get(f"{server.base_url}/version", timeout=5).json()
        assert set(version) >= {"version", "torch", "diffusers"}
        docs = httpx.get(f"{server.base_url}/docs", timeout=5)
        assert docs.status_code == 200 and "swagger-ui" in docs.text and "openapi.json" in docs.text


async def test_a_misspelt_field_is_named_in_a_header() -> None:
    """Unknown fields stay allowed (clients send fields this server does not use), and are named back."""
    async with served(digits_settings()) as app, client_of(app, timeout=60) as client:
        misspelt = await client.post(URL, json={"prompt": "the digit 7", "sede": 5, "Größe": 1})
        assert misspelt.status_code == 200
        assert misspelt.headers["x-ignored-fields"] == "Gr\\xf6\\xdfe, sede"
        clean = await client.post(URL, json={"prompt": "the digit 7", "seed": 5})
        assert clean.status_code == 200 and "x-ignored-fields" not in clean.headers


def test_a_taken_port_is_one_line_naming_port() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "diffuserve", "serve", "--port", str(port), "--devices", "cpu"],
            env=server_free_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"diffuserve serve: port {port} on 127.0.0.1 is taken; set PORT (or --port) to a free one"
    ]


def test_a_reader_that_leaves_early_gets_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """`diffuserve deploy modal --dry-run | head -1`: the pipe closes while the plan is printed."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone: every write fails with EPIPE
    saved = os.dup(1)
    try:
        closed = os.fdopen(write, "w", buffering=1)
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["deploy", "modal", "--dry-run"]) == 0
    finally:
        os.dup2(saved, 1)
        os.close(saved)
