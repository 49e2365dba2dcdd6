"""`diffuserve pull` as a user runs it: a subprocess pointed at a local stand-in for the hub through HF_ENDPOINT
(the hub library reads it when imported), printing the folder on success and one line on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from diffuserve.models.digits.lora_train import MIRROR_WEIGHTS
from tests.fake_hub import FakeHub, serve_fake_hub, tiny_pipeline_folder
from tests.helpers import free_port, server_handle, start_server


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def fake_hub(pipeline_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    folder = pipeline_folder
    bare = tmp_path_factory.mktemp("bare")
    (bare / "config.json").write_text("{}")
    with serve_fake_hub() as server:
        server.add_repo("tiny/flux", folder)
        server.add_repo("tiny/gated", folder, gated_token="hf_right")
        server.add_repo("tiny/bare", bare)
        adapter = tmp_path_factory.mktemp("adapter")
        shutil.copyfile(MIRROR_WEIGHTS, adapter / "pytorch_lora_weights.safetensors")
        server.add_repo("tiny/mirror-lora", adapter)
        two = tmp_path_factory.mktemp("two-adapters")
        for name in ("a.safetensors", "b.safetensors"):
            shutil.copyfile(MIRROR_WEIGHTS, two / name)
        server.add_repo("tiny/two-loras", two)
        yield server


def run_pull(*args: str, home: Path, endpoint: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`diffuserve pull ARGS` with a cache of its own and no hub variable of this machine."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    base.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run(
        [sys.executable, "-m", "diffuserve", "pull", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffuserve pull: "), result.stderr
    return lines[0]


def test_pull_prints_progress_lines_then_the_folder(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = run_pull("tiny/flux", home=tmp_path, endpoint=fake_hub.url)
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder.is_dir() and folder.is_relative_to(tmp_path / "hub" / "models--tiny--flux" / "snapshots")
    # stderr is a pipe here: plain lines, the first and the last at least, not a bar.
    lines = result.stderr.splitlines()
    assert lines[0].startswith("pulling tiny/flux  ") and "\r" not in result.stderr
    assert lines[-1].startswith("pulling tiny/flux  1.34/1.34 MB  100%") and lines[-1].endswith(
        "(14/14 files)"
    )

    # Everything is cached now: the same folder, offline too.
    again = run_pull("tiny/flux", home=tmp_path, endpoint="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    assert again.returncode == 0 and again.stdout.strip() == str(folder)


def test_builtin_models_and_local_folders_need_nothing(
    fake_hub: FakeHub, pipeline_folder: Path, tmp_path: Path
) -> None:
    folder = pipeline_folder
    result = run_pull("tiny-random", str(folder), home=tmp_path, endpoint=fake_hub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "tiny-random: built in, nothing to pull",
        f"{folder.resolve()}: local pipeline folder, nothing to pull",
    ]
    not_pipeline = one_line_error(run_pull(str(tmp_path), home=tmp_path, endpoint=fake_hub.url))
    assert "is not a diffusers pipeline folder (no model_index.json)" in not_pipeline


def test_missing_repo_and_repo_without_model_index(fake_hub: FakeHub, tmp_path: Path) -> None:
    # Several models in one run: each failure is its own line, and the exit status says one failed.
    result = run_pull("tiny/nope", "tiny/bare", home=tmp_path, endpoint=fake_hub.url)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "diffuserve pull: tiny/nope not found on the hub; check the id (a private repo also needs HF_TOKEN)",
        "diffuserve pull: tiny/bare is not a diffusers pipeline (the repo has no model_index.json)",
    ]


def test_gated_repo_needs_hf_token(fake_hub: FakeHub, tmp_path: Path) -> None:
    denied = one_line_error(run_pull("tiny/gated", home=tmp_path, endpoint=fake_hub.url))
    assert "HF_TOKEN" in denied and f"{fake_hub.url}/tiny/gated" in denied
    allowed = run_pull("tiny/gated", home=tmp_path, endpoint=fake_hub.url, HF_TOKEN="hf_right")
    assert allowed.returncode == 0, allowed.stderr
    assert Path(allowed.stdout.strip(), "model_index.json").is_file()


def test_unreachable_hub(tmp_path: Path) -> None:
    message = one_line_error(run_pull("tiny/flux", home=tmp_path, endpoint="http://127.0.0.1:9"))
    assert "cannot reach the hub at http://127.0.0.1:9" in message and "HF_HUB_OFFLINE=1" in message
    assert "Traceback" not in message


def test_serve_pulls_a_model_missing_from_the_cache_with_progress_in_readiness(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    """`diffuserve serve org/name` on an empty cache: readiness says `downloading` with the bytes so far while
    the pull runs, the log shows its progress, then the workers load what was pulled and the model answers."""
    weights = next(
        name
        for name in fake_hub.repos["tiny/flux"].files
        if name.startswith("transformer/") and name.endswith(".safetensors")
    )
    release = fake_hub.hold("tiny/flux", weights)
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": fake_hub.url, "HF_HUB_DISABLE_XET": "1", "DEVICES": "cpu"}
    env["WARMUP"] = (
        "0"  # the saved tiny FLUX passes for FLUX.1 (1024² by default): too slow to warm up on a CPU
    )
    handle = server_handle(["tiny/flux"], **env)
    try:
        handle.start()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, handle.log_tail()
            with contextlib.suppress(httpx.TransportError):
                model = httpx.get(f"{handle.base_url}/health/ready", timeout=5).json()["models"][0]
                if model["status"] == "downloading" and model.get("download", {}).get("bytes_done"):
                    break
            time.sleep(0.1)
        download = model["download"]
        assert model["name"] == "flux-xl-bs4" and download["repo"] == "tiny/flux"
        assert 0 < download["bytes_done"] < download["bytes_total"]
        release.set()
        handle.wait_ready()
        answer = httpx.post(
            f"{handle.base_url}/v1/images/generations",
            json={"prompt": "a", "size": "256x256", "num_inference_steps": 1},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        log = handle.log_path.read_text()
        assert "flux-xl-bs4 is not in the hub cache: pulling tiny/flux" in log
        assert "pulling flux-xl-bs4" in log and "done" in log
    finally:
        release.set()
        handle.stop()
    # Once in the cache, the model starts with the hub out of reach: neither the server nor its workers ask it.
    down = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}
    with start_server(["tiny/flux"], **down) as again:
        assert httpx.get(f"{again.base_url}/health/ready", timeout=5).json()["models"][0]["status"] == "ready"
        assert "pulling" not in again.log_path.read_text()


def serve_failure(fake_hub: FakeHub, home: Path, *args: str) -> str:
    """`diffuserve serve ARGS` against the stand-in hub, expected to stop at start: its last line, checked to be
    the only thing a user needs (exit 1, no traceback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=fake_hub.url, HF_HUB_DISABLE_XET="1", DEVICES="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "diffuserve", "serve", "--port", str(free_port()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_serve_of_a_repo_the_hub_does_not_have_exits_in_one_line(fake_hub: FakeHub, tmp_path: Path) -> None:
    assert serve_failure(fake_hub, tmp_path, "tiny/missing") == (
        "diffuserve serve: could not pull the model missing-xl-bs4: tiny/missing not found on the hub; check the "
        "id (a private repo also needs HF_TOKEN)"
    )


def test_serve_pulls_an_adapter_named_at_start_from_the_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    """`--lora NAME=org/repo`: the adapter's file comes into the hub cache through the models' pull code before
    the workers start, requests apply it, and a restart with the hub out of reach reads it from the cache."""
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": fake_hub.url, "HF_HUB_DISABLE_XET": "1", "DEVICES": "cpu"}
    body = {"prompt": "the digit 3", "seed": 5, "output_format": "png"}

    def images(base_url: str) -> tuple[bytes, bytes]:
        url = f"{base_url}/v1/images/generations"
        plain = httpx.post(url, json=body, timeout=60)
        adapted = httpx.post(url, json={**body, "loras": [{"name": "mirror"}]}, timeout=60)
        assert plain.status_code == adapted.status_code == 200, adapted.text
        return plain.content, adapted.content

    with start_server(["--lora", "mirror=tiny/mirror-lora"], **env) as server:
        plain, adapted = images(server.base_url)
        assert plain != adapted
        listed = httpx.get(f"{server.base_url}/v1/loras", timeout=5).json()["data"]
        assert [(a["id"], a["rank"]) for a in listed] == [("mirror", 4)]
        assert "adapter mirror: pulling tiny/mirror-lora" in server.log_path.read_text()
    down = {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    with start_server(["--lora", "mirror=tiny/mirror-lora"], **down) as again:
        assert images(again.base_url) == (plain, adapted)


def test_serve_with_an_adapter_repo_of_several_files_exits_in_one_line(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    assert serve_failure(fake_hub, tmp_path, "--lora", "x=tiny/two-loras") == (
        "diffuserve serve: could not pull an adapter: tiny/two-loras holds 2 .safetensors files (a.safetensors, "
        "b.safetensors): name one as REPO:FILE"
    )
