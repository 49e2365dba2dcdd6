"""The TheStage/Modal tutorial's curl and OpenAI-client calls work unchanged against a local server: a real
`diffuserve serve` on a real socket, as the tutorial's readers run it. (The SDK's other calls and the headers
are checked in process: tests/integration/test_generations.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
