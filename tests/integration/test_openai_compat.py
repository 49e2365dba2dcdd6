"""The TheStage/Modal tutorial's curl and OpenAI-client calls work unchanged against a local server."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.helpers import ServerHandle, decode_image

SEED_BODY = {"seed": 111, "aspect_ratio": "1:1", "guidance_scale": 3.5, "num_inference_steps": 28}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_seed_curl_call_writes_webp(server: ServerHandle, tmp_path: Path) -> None:
    out = tmp_path / "out.webp"
    body = '{"prompt": "write `Modal` on a beach", "seed": 111, "aspect_ratio": "1:1", "guidance_scale": 3.5, "num_inference_steps": 28}'
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"{server.base_url}/v1/images/generations",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"X-Model-Name: {server.model_name()}",
            "-d",
            body,
            "--output",
            str(out),
            "-D",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert " 200" in result.stdout.splitlines()[0]
    assert "content-type: image/webp" in result.stdout.lower()
    assert "x-request-id:" in result.stdout.lower()
    image = decode_image(out.read_bytes())
    assert image.format == "WEBP"
    assert image.size == (32, 32)


def test_openai_raw_response_writes_webp(server: ServerHandle, tmp_path: Path) -> None:
    model = server.model_name()
    client = OpenAI(
        api_key="unused", base_url=f"{server.base_url}/v1", default_headers={"X-Model-Name": model}
    )
    response = client.with_raw_response.images.generate(
        model=model, prompt="write `Modal` on a beach, make realistic photo", n=1, extra_body=SEED_BODY
    )
    out = tmp_path / "modal_thestage.webp"
    with open(out, "wb") as f:
        f.write(response.content)
    assert response.headers["content-type"] == "image/webp"
    assert decode_image(out.read_bytes()).format == "WEBP"
    assert response.headers["x-seed"] == "111"


def test_openai_images_generate_returns_b64_of_requested_size(server: ServerHandle) -> None:
    client = OpenAI(api_key="unused", base_url=f"{server.base_url}/v1")
    result = client.images.generate(
        model=server.model_name(), prompt="the digit 4", n=2, size="48x32", extra_body={"seed": 5}
    )
    assert len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = decode_image(base64.b64decode(item.b64_json))
        assert image.size == (48, 32)
    raw = result.model_dump()
    assert [d["seed"] for d in raw["data"]] == [5, 6]
    assert raw["size"] == "48x32"
    assert raw["output_format"] == "webp"


def test_model_alias_header_and_timing_headers(server: ServerHandle) -> None:
    response = httpx.post(
        f"{server.base_url}/images/generations",
        json={"prompt": "seven", "output_format": "png", "seed": 1},
        headers={"X-Model-Name": "tiny-random" if "tiny-random" in server.model_name() else "digits"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    for header in ("x-request-id", "x-queue-ms", "x-inference-ms", "x-batch-size", "server-timing"):
        assert header in response.headers
    assert float(response.headers["x-inference-ms"]) > 0


def test_incoming_request_id_is_echoed(server: ServerHandle) -> None:
    response = httpx.get(f"{server.base_url}/v1/models", headers={"X-Request-Id": "abc-123"}, timeout=10)
    assert response.headers["x-request-id"] == "abc-123"


def test_models_list_shape(server: ServerHandle) -> None:
    body = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == server.model_name()
    assert body["data"][0]["object"] == "model"
    client = OpenAI(api_key="unused", base_url=f"{server.base_url}/v1")
    assert [m.id for m in client.models.list()] == [server.model_name()]


def test_health_endpoints(server: ServerHandle) -> None:
    for path in ("/health/live", "/v2/health/live", "/health/ready", "/v2/health/ready"):
        assert httpx.get(f"{server.base_url}{path}", timeout=10).status_code == 200


def test_n_above_model_batch_runs_in_parts_with_consecutive_seeds(server: ServerHandle) -> None:
    """The shared server batches at most 8 images: n=10 runs as 8 + 2 and comes back whole, in order."""
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "the digit 2", "n": 10, "seed": 40, "response_format": "b64_json"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert [d["seed"] for d in response.json()["data"]] == list(range(40, 50))
    assert int(response.headers["x-batch-size"]) <= 8
