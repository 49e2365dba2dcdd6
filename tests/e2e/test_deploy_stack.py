"""The production process tree for real: start.sh → supervisord → model server + readiness-gated nginx, on loopback."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from diffuserve.deploy import DEPLOY_DIR
from tests.helpers import free_port, process_alive

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
SEARCH_PATH = os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
NGINX = shutil.which("nginx", path=SEARCH_PATH)
SUPERVISORD = shutil.which("supervisord", path=SEARCH_PATH)
SUPERVISORCTL = shutil.which("supervisorctl", path=SEARCH_PATH)
if NGINX is None or SUPERVISORD is None:
    pytest.skip(
        f"needs nginx and supervisord binaries (found nginx={NGINX}, supervisord={SUPERVISORD}); "
        "install with: apt-get install -y nginx supervisor",
        allow_module_level=True,
    )

API_KEY = "sk-e2e-front-key-0001"
MAX_BODY = 64 * 1024
STARTUP_TIMEOUT = 240.0  # the whole tree on 2 shared CPU cores: imports, tiny model, warm-up


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    public: str
    internal: str
    run_dir: Path
    log_dir: Path
    # What the public and internal ports answered while the model was loading (recorded by the fixture).
    startup: list[tuple[float, str, str]] = field(default_factory=list)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, text: str, timeout: float = 15.0) -> str:
        """The first line of `name`.log holding `text`; supervisord copies program output asynchronously."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log(name).splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in {name}.log after {timeout}s\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {n}.log ---\n{self.log(n)[-4000:]}" for n in ("supervisord", "model", "nginx"))

    def supervisorctl(self, *args: str) -> str:
        result = subprocess.run(
            [SUPERVISORCTL or "supervisorctl", "-c", str(self.run_dir / "supervisord.conf"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PATH": SEARCH_PATH},
        )
        return result.stdout.strip()

    def model_pid(self) -> int:
        return int(self.supervisorctl("pid", "model"))


def _probe(url: str) -> str:
    """'refused' when nothing listens, else the status code (and error code for JSON errors)."""
    try:
        response = httpx.get(url, timeout=2, headers={"Authorization": f"Bearer {API_KEY}"})
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}"
    return str(response.status_code)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
    return pids


def _teardown(process: subprocess.Popen[bytes]) -> None:
    sid = process.pid  # start_new_session: the session id is start.sh's pid (now supervisord's)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # supervisord stops nginx and the model's whole group
        try:
            process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # supervisord gives each program its own process group, so sweep the session for anything left.
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("front")
    public_port, server_port = free_port(), free_port()
    while server_port == public_port:
        server_port = free_port()
    env = {
        **os.environ,
        "PATH": SEARCH_PATH,
        "DIFFUSERVE_PYTHON": sys.executable,
        "DIFFUSERVE_RUN_DIR": str(root / "run"),
        "DIFFUSERVE_LOG_DIR": str(root / "logs"),
        "PORT": str(public_port),
        "SERVER_PORT": str(server_port),
        "FRONT_HOST": "127.0.0.1",
        "HF_HOME": str(root / "hf"),
        "MODEL_REPO": "tiny-random",
        "WARMUP": "1",
        "MAX_BODY_BYTES": str(MAX_BODY),
        "API_KEYS": API_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("AUTH_TOKEN", "MODEL_NAME", "NGINX_USER", "DIFFUSERVE_BIN", "FRONT_AUTH"):
        env.pop(name, None)  # the developer's shell must not change what is under test
    out = (root / "start.out").open("wb")
    process = subprocess.Popen(
        [str(DEPLOY_DIR / "start.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    handle = Stack(
        process=process,
        public=f"http://127.0.0.1:{public_port}",
        internal=f"http://127.0.0.1:{server_port}",
        run_dir=root / "run",
        log_dir=root / "logs",
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"start.sh exited with {process.returncode}:\n{(root / 'start.out').read_text()}"
                )
            public = _probe(f"{handle.public}/v1/models")
            internal = _probe(f"{handle.internal}/v2/health/ready")
            handle.startup.append((time.monotonic(), internal, public))
            if public == "200":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"front not serving after {STARTUP_TIMEOUT}s\n{handle.logs()}")
            time.sleep(0.1)
        yield handle
    finally:
        _teardown(process)
        out.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def _model_id(stack: Stack) -> str:
    response = httpx.get(f"{stack.public}/v1/models", headers=_auth(), timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["data"][0]["id"])


def _assert_envelope(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_public_port_stays_closed_until_the_model_is_ready(stack: Stack) -> None:
    loading = [(t, internal, public) for t, internal, public in stack.startup if public != "200"]
    # Nothing answered on the public port before readiness: connections were refused, never nginx HTML/502.
    assert loading and all(public == "refused" for _, _, public in loading), stack.startup
    # The server was up but still loading (503 on ready) while the public port was closed: the gate, not luck.
    assert any(internal == "503" for _, internal, _ in loading), stack.startup
    # Once ready, nginx opened promptly.
    first_ready = next(t for t, internal, _ in stack.startup if internal == "200")
    assert stack.startup[-1][0] - first_ready < 15, stack.startup
    stack.wait_for_log("nginx", "is ready; exec")


def test_seed_curl_call_returns_webp_through_nginx(stack: Stack) -> None:
    model = _model_id(stack)
    response = httpx.post(
        f"{stack.public}/v1/images/generations",
        headers={
            **_auth(),
            "Content-Type": "application/json",
            "X-Model-Name": model,
            "X-Request-Id": "seed-curl-1",
        },
        content=json.dumps(
            {
                "prompt": "write `Modal` on a beach, make realistic photo",
                "seed": 111,
                "aspect_ratio": "1:1",
                "guidance_scale": 3.5,
                "num_inference_steps": 4,
            }
        ),
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    assert response.content[:4] == b"RIFF" and response.content[8:12] == b"WEBP"
    # The client's request id survives nginx and comes back exactly once.
    assert response.headers.get_list("x-request-id") == ["seed-curl-1"]
    stack.wait_for_log("model", "request_id=seed-curl-1")


def test_request_id_is_generated_when_absent(stack: Stack) -> None:
    response = httpx.get(f"{stack.public}/v1/models", headers=_auth(), timeout=10)
    ids = response.headers.get_list("x-request-id")
    assert len(ids) == 1 and len(ids[0]) == 32  # nginx's $request_id
    stack.wait_for_log("model", f"request_id={ids[0]}")  # the server logged the id nginx passed


def test_openai_client_through_nginx(stack: Stack) -> None:
    openai = pytest.importorskip("openai")
    model = _model_id(stack)
    client = openai.OpenAI(
        api_key=API_KEY, base_url=f"{stack.public}/v1", default_headers={"X-Model-Name": model}, max_retries=0
    )
    extra = {"seed": 111, "aspect_ratio": "1:1", "guidance_scale": 3.5, "num_inference_steps": 4}

    result = client.images.generate(model=model, prompt="a lighthouse", n=1, extra_body=extra)
    image = base64.b64decode(result.data[0].b64_json or "")
    assert image[:4] == b"RIFF" and image[8:12] == b"WEBP"

    # The tutorial-style call: raw response, body written as a .webp file.
    raw = client.with_raw_response.images.generate(model=model, prompt="a lighthouse", n=1, extra_body=extra)
    assert raw.http_response.status_code == 200
    assert raw.content[:4] == b"RIFF" and raw.content[8:12] == b"WEBP"
    assert raw.content == image  # same seed, same image, whichever way it is returned


def test_edits_take_pictures_over_the_json_body_limit_and_streams_pass_through(stack: Stack) -> None:
    """Edits have their own body limit in nginx (MAX_UPLOAD_BYTES), and event streams are not buffered away."""
    openai = pytest.importorskip("openai")
    import io

    import numpy as np
    from PIL import Image

    model = _model_id(stack)
    client = openai.OpenAI(api_key=API_KEY, base_url=f"{stack.public}/v1", max_retries=0, timeout=120)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    picture = buffer.getvalue()
    assert len(picture) > MAX_BODY  # a generation body this large would be a 413 at the front
    edited = client.images.edit(
        model=model,
        image=("noise.png", picture, "image/png"),
        prompt="a lighthouse",
        size="32x32",
        extra_body={"seed": 4, "strength": 0.5, "output_format": "png"},
    )
    assert edited.data is not None and base64.b64decode(edited.data[0].b64_json or "")[:4] == b"\x89PNG"
    events = list(
        client.images.generate(
            model=model, prompt="a lighthouse", stream=True, partial_images=1, extra_body={"seed": 4}
        )
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]


def test_image_urls_point_at_the_front(stack: Stack) -> None:
    openai = pytest.importorskip("openai")
    model = _model_id(stack)
    client = openai.OpenAI(api_key=API_KEY, base_url=f"{stack.public}/v1", max_retries=0)
    extra = {"seed": 112, "num_inference_steps": 4}
    by_url = client.images.generate(
        model=model, prompt="a lighthouse", response_format="url", extra_body=extra
    )
    by_b64 = client.images.generate(
        model=model, prompt="a lighthouse", response_format="b64_json", extra_body=extra
    )
    url = by_url.data[0].url or ""
    # The front's public port, not the server's loopback one: nginx passed on the host the client used.
    assert url.startswith(f"{stack.public}/v1/images/"), url
    download = httpx.get(url, headers=_auth(), timeout=10)
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "image/webp"
    assert download.content == base64.b64decode(by_b64.data[0].b64_json or "")
    # nginx checks the key on this route too.
    _assert_envelope(httpx.get(url, timeout=10), 401, "invalid_api_key")
    # The server's 404 for an id it does not hold passes through unchanged.
    unknown = httpx.get(f"{stack.public}/v1/images/{'A' * 32}/content", headers=_auth(), timeout=10)
    _assert_envelope(unknown, 404, "image_not_found")

    # A client's own forwarded headers never reach the server: nginx sets them from the request it received, so
    # nobody picks the host written into links (a server exposed behind another proxy sets PUBLIC_URL).
    response = httpx.post(
        f"{stack.public}/v1/images/generations",
        headers={**_auth(), "X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.test"},
        json={"prompt": "a lighthouse", "response_format": "url", "num_inference_steps": 1},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    forged = response.json()["data"][0]["url"]
    assert forged.startswith(f"{stack.public}/v1/images/"), forged


def test_bearer_check_happens_in_nginx(stack: Stack) -> None:
    response = httpx.get(f"{stack.public}/v1/models", headers={"X-Request-Id": "no-key-1"}, timeout=10)
    _assert_envelope(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    nginx_line = stack.wait_for_log("nginx", "request_id=no-key-1")
    assert "upstream=-/-" in nginx_line  # rejected before reaching the server
    wrong = httpx.get(
        f"{stack.public}/v1/models", headers={"Authorization": "Bearer wrong-key-123"}, timeout=10
    )
    _assert_envelope(wrong, 401, "invalid_api_key")
    # Probes need no key.
    assert httpx.get(f"{stack.public}/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{stack.public}/v2/health/live", timeout=10).status_code == 200


def test_oversized_body_is_413_json(stack: Stack) -> None:
    body = json.dumps({"prompt": "x" * (MAX_BODY + 1024)})
    response = httpx.post(
        f"{stack.public}/v1/images/generations",
        headers={**_auth(), "Content-Type": "application/json"},
        content=body,
        timeout=30,
    )
    error = _assert_envelope(response, 413, "payload_too_large")
    assert str(MAX_BODY) in error["message"]
    assert "<html" not in response.text.lower()


def test_unknown_routes_are_404_json(stack: Stack) -> None:
    outside = httpx.get(f"{stack.public}/does-not-exist", headers=_auth(), timeout=10)
    _assert_envelope(outside, 404, "not_found")
    assert "<html" not in outside.text.lower()
    # Under /v1/ the server answers with its own envelope, passed through unchanged.
    inside = httpx.post(f"{stack.public}/v1/nope", headers=_auth(), json={}, timeout=10)
    _assert_envelope(inside, 404)


def test_kill_9_of_model_server_is_restarted(stack: Stack) -> None:
    model = _model_id(stack)
    old_pid = stack.model_pid()
    old_group = [pid for pid in _session_pids(stack.process.pid) if _pgid(pid) == old_pid]
    assert old_pid in old_group
    os.kill(old_pid, signal.SIGKILL)

    deadline = time.monotonic() + STARTUP_TIMEOUT
    outages: list[tuple[int, str]] = []
    request = {"prompt": "after the crash", "seed": 7, "num_inference_steps": 1}
    while True:
        # Generation itself is the probe: it needs the server up, a worker loaded and nginx proxying.
        response = _try_post(f"{stack.public}/v1/images/generations", model, request)
        if response is not None and response.status_code == 200:
            break
        if response is not None:
            # Down (nginx: 502) or reloading (server: 503): either way an OpenAI envelope, never HTML.
            error = _assert_envelope(response, response.status_code)
            assert response.status_code in (502, 503), response.text
            outages.append((response.status_code, str(error["code"])))
        if time.monotonic() > deadline:
            raise TimeoutError(f"not serving again after kill -9\n{stack.logs()}")
        time.sleep(0.2)
    assert response.content[8:12] == b"WEBP"
    assert (502, "upstream_unavailable") in outages, outages  # nginx stayed up and reported the outage

    assert stack.model_pid() != old_pid
    assert "RUNNING" in stack.supervisorctl("status", "nginx")
    assert httpx.get(f"{stack.public}/health/ready", timeout=10).status_code == 200
    # Nothing of the killed server survives: its workers die with it.
    assert not [pid for pid in old_group if process_alive(pid)], stack.logs()


def _try_post(url: str, model: str, body: dict) -> httpx.Response | None:
    try:
        return httpx.post(url, headers={**_auth(), "X-Model-Name": model}, json=body, timeout=30)
    except httpx.HTTPError:
        return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
