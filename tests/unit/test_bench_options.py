"""`diffuserve bench`'s load options: flag parsing, the BENCH_* env round trip, payloads and response checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from diffuserve.bench.options import (
    LoadOptions,
    OptionError,
    normalize_base_url,
    parse_aspect_ratio,
    parse_size,
    parse_users,
    response_problem,
)


def test_parse_users() -> None:
    assert parse_users("1,2,4,8,16") == [1, 2, 4, 8, 16]
    assert parse_users(" 3 , 1 ") == [3, 1]
    for bad in ("", "1,x", "0,2", "2,2", "-1"):
        with pytest.raises(OptionError, match="--users"):
            parse_users(bad)


def test_parse_size_and_aspect_ratio() -> None:
    assert parse_size("512x768") == (512, 768)
    assert parse_size("64X64") == (64, 64)
    assert parse_aspect_ratio("16:9") == "16:9"
    for bad in ("512", "0x64", "axb", "512*512"):
        with pytest.raises(OptionError, match="--size"):
            parse_size(bad)
    for bad in ("16/9", "0:1", "wide"):
        with pytest.raises(OptionError, match="--aspect-ratio"):
            parse_aspect_ratio(bad)


def test_normalize_base_url() -> None:
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_base_url("https://x.modal.run") == "https://x.modal.run"
    with pytest.raises(OptionError, match="URL"):
        normalize_base_url("localhost:8000")


def test_validation_names_the_flag() -> None:
    with pytest.raises(OptionError, match="not both"):
        LoadOptions(size="64x64", aspect_ratio="1:1")
    with pytest.raises(OptionError, match="--steps"):
        LoadOptions(steps=0)
    with pytest.raises(OptionError, match="--n"):
        LoadOptions(n=0)
    with pytest.raises(OptionError, match="--response-format"):
        LoadOptions(response_format="url")


def test_several_images_per_request_need_json() -> None:
    # The server answers several images only as JSON: raw bytes with n > 1 would fail every request.
    with pytest.raises(OptionError, match="--n 2 needs --response-format b64_json"):
        LoadOptions(n=2)
    with pytest.raises(OptionError, match="--n 3 needs --response-format b64_json"):
        LoadOptions.from_env({"BENCH_N": "3"})
    assert LoadOptions(n=2, response_format="b64_json").n == 2


def test_env_round_trip(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n a dog \n", encoding="utf-8")
    opts = LoadOptions(
        url="http://127.0.0.1:9/v1",
        api_key="k",
        model="tiny-random-xl-bs4",
        prompt_file=str(prompts),
        aspect_ratio="16:9",
        steps=4,
        guidance=3.5,
        seed=7,
        n=2,
        response_format="b64_json",
        iterations=32,
        timeout=30.0,
    )
    env = opts.to_env()
    assert env["BENCH_URL"] == "http://127.0.0.1:9"
    assert env["API_KEY"] == "k"
    assert "BENCH_SIZE" not in env
    again = LoadOptions.from_env(env)
    assert again == opts
    assert again.prompts == ["a cat", "a dog"]


def test_from_env_rejects_non_numbers() -> None:
    with pytest.raises(OptionError, match="BENCH_STEPS"):
        LoadOptions.from_env({"BENCH_STEPS": "many"})


def test_prompt_file_errors(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="cannot be read"):
        LoadOptions(prompt_file=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(OptionError, match="no prompt"):
        LoadOptions(prompt_file=str(empty))


def test_payload_and_headers() -> None:
    opts = LoadOptions(model="m", api_key="k", size="64x64", steps=2, guidance=1.5)
    body = opts.payload(random.Random(0))
    assert body["model"] == "m" and body["size"] == "64x64" and body["n"] == 1
    assert body["num_inference_steps"] == 2 and body["guidance_scale"] == 1.5
    assert "response_format" not in body  # raw image bytes: no OpenAI field needed
    assert 0 <= body["seed"] < 2**31
    headers = opts.headers()
    assert headers["X-Model-Name"] == "m"
    assert headers["Authorization"] == "Bearer k"
    assert headers["Accept"] == "*/*"

    as_json = LoadOptions(response_format="b64_json", n=2)
    assert as_json.payload(random.Random(0))["response_format"] == "b64_json"
    assert as_json.payload(random.Random(0))["n"] == 2
    assert as_json.headers()["Accept"] == "application/json"
    assert "Authorization" not in as_json.headers()


def test_seeds_random_per_request_unless_fixed() -> None:
    rng = random.Random(1)
    seeds = {LoadOptions().payload(rng)["seed"] for _ in range(20)}
    assert len(seeds) > 1
    assert {LoadOptions(seed=5).payload(rng)["seed"] for _ in range(5)} == {5}


def test_response_problem() -> None:
    image = {"content-type": "image/webp"}
    assert response_problem(200, image, b"RIFF", 1) is None
    assert response_problem(200, image, b"", 1) == "HTTP 200 with an empty body"
    envelope = json.dumps(
        {"error": {"message": "unknown model 'x'", "type": "invalid_request_error"}}
    ).encode()
    assert (
        response_problem(404, {"content-type": "application/json"}, envelope, 1)
        == "HTTP 404: unknown model 'x'"
    )
    assert response_problem(502, {}, b"<html>bad gateway</html>", 1) == "HTTP 502: <html>bad gateway</html>"
    js = {"content-type": "application/json"}
    two = json.dumps({"data": [{"b64_json": "AA"}, {"b64_json": "BB"}]}).encode()
    assert response_problem(200, js, two, 2) is None
    assert response_problem(200, js, two, 1) == "expected 1 b64_json image(s), got 2"
    assert response_problem(200, js, b"{}", 1) == "HTTP 200 JSON without a `data` list"


def test_bench_flags_win_over_bench_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from diffuserve.bench.command import _load_options, register

    monkeypatch.setenv("BENCH_STEPS", "8")
    monkeypatch.setenv("BENCH_GUIDANCE", "1.5")
    monkeypatch.setenv("BENCH_PROMPT_FILE", "/nonexistent/prompts.txt")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    opts = _load_options(parser.parse_args(["bench", "http://h:1/v1", "--steps", "2", "--prompt", "x"]))
    assert opts.steps == 2 and opts.guidance == 1.5  # flag over env; env where no flag
    assert opts.prompt_file is None and opts.prompts == ["x"]  # --prompt replaces the env's prompt file
    assert opts.url == "http://h:1" and opts.iterations is None
