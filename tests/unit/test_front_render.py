"""The front's renderer and readiness gate, without starting nginx or supervisord."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffuserve.deploy.render import PLACEHOLDER, FrontConfig, FrontConfigError, fill, main, render

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
FRONT_VARS = (
    "PORT",
    "FRONT_PORT",
    "SERVER_PORT",
    "FRONT_HOST",
    "API_KEYS",
    "AUTH_TOKEN",
    "FRONT_AUTH",
    "MAX_BODY_BYTES",
    "REQUEST_TIMEOUT",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in FRONT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIFFUSERVE_RUN_DIR", str(tmp_path / "run"))
    return monkeypatch


def test_render_fills_every_placeholder(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("PORT", "18080")
    env.setenv("SERVER_PORT", "18081")
    env.setenv("MAX_BODY_BYTES", "65536")
    env.setenv("REQUEST_TIMEOUT", "120")
    out = render(FrontConfig.from_env())
    nginx = out.nginx_conf.read_text()
    supervisord = out.supervisord_conf.read_text()
    assert PLACEHOLDER.search(nginx) is None and PLACEHOLDER.search(supervisord) is None
    assert "listen 0.0.0.0:18080 default_server" in nginx
    assert "server 127.0.0.1:18081" in nginx
    assert "client_max_body_size 65536;" in nginx
    assert "proxy_read_timeout 150s;" in nginx  # the server's deadline + 30 s
    assert "map $http_authorization" not in nginx  # no keys, no check
    # nginx waits for readiness; the server listens on loopback only.
    assert "diffuserve.deploy.gate --url http://127.0.0.1:18081/v2/health/ready" in supervisord
    assert "serve --host 127.0.0.1 --port 18081" in supervisord
    assert oct(out.nginx_conf.stat().st_mode & 0o777) == "0o600"


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (CI installs it: apt-get install nginx)")
@pytest.mark.parametrize("keys", ["", "sk-test-key-0001,sk-test-key-0002"])
def test_rendered_nginx_config_is_valid(env: pytest.MonkeyPatch, keys: str) -> None:
    env.setenv("API_KEYS", keys)
    out = render(FrontConfig.from_env(front_port=18080, server_port=18081))
    if keys:
        text = out.nginx_conf.read_text()
        assert '"Bearer sk-test-key-0001" 1;' in text and '"Bearer sk-test-key-0002" 1;' in text
        assert "if ($diffuserve_key_ok = 0)" in text
    result = subprocess.run(
        [str(NGINX), "-t", "-q", "-e", "stderr", "-c", str(out.nginx_conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_front_auth_can_be_left_to_the_server(env: pytest.MonkeyPatch) -> None:
    env.setenv("API_KEYS", "key with spaces")
    with pytest.raises(FrontConfigError, match="FRONT_AUTH=0"):
        FrontConfig.from_env()
    env.setenv("FRONT_AUTH", "0")
    text = render(FrontConfig.from_env()).nginx_conf.read_text()
    assert "key with spaces" not in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"front_port": 8001, "server_port": 8001}, "FRONT_PORT/PORT and SERVER_PORT must differ"),
        (
            {"front_port": 70000},
            r"FRONT_PORT/PORT \(--front-port\): Input should be less than or equal to 65535",
        ),
        ({"run_dir": Path("relative/run")}, "must be an absolute path"),
        ({"run_dir": Path("/tmp/with space")}, "DIFFUSERVE_RUN_DIR"),
        (
            {"nginx_workers": 0},
            r"NGINX_WORKERS \(--nginx-workers\): Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_front_settings_name_the_variable(
    env: pytest.MonkeyPatch, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(FrontConfigError, match=message):
        FrontConfig.from_env(**overrides)


def test_public_port_has_its_own_name_and_honours_a_platform_port(env: pytest.MonkeyPatch) -> None:
    env.setenv("PORT", "9000")
    assert FrontConfig.from_env().front_port == 9000  # a platform's PORT is the container's public port
    env.setenv("FRONT_PORT", "9100")
    cfg = FrontConfig.from_env()
    assert cfg.front_port == 9100
    # The model server gets SERVER_PORT as a flag, which wins over any PORT in its environment.
    assert cfg.model_command()[-2:] == ["--port", "8001"]


def test_a_mistyped_front_boolean_is_an_error(env: pytest.MonkeyPatch) -> None:
    env.setenv("FRONT_AUTH", "of")
    with pytest.raises(
        FrontConfigError, match=r"FRONT_AUTH \(--front-auth\): Input should be a valid boolean"
    ):
        FrontConfig.from_env()


def test_render_flags_win_over_env(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("FRONT_PORT", "18080")
    assert main(["--out", str(tmp_path / "flags"), "--front-port", "18090", "--no-front-auth"]) == 0
    assert "listen 0.0.0.0:18090 default_server" in (tmp_path / "flags" / "nginx.conf").read_text()
    assert main(["--nginx-workers", "zero"]) == 2
    assert "NGINX_WORKERS (--nginx-workers)" in capsys.readouterr().err


def test_fill_rejects_unknown_placeholders() -> None:
    assert fill("a @@X@@ b", {"X": "1"}) == "a 1 b"
    with pytest.raises(KeyError, match="@@Y@@"):
        fill("@@Y@@", {})


class _Health(http.server.BaseHTTPRequestHandler):
    ready_after = 0.0

    def do_GET(self) -> None:
        self.send_response(200 if time.monotonic() >= type(self).ready_after else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[str, type[_Health]]]:
    handler = type("Health", (_Health,), {"ready_after": time.monotonic() + 1.0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v2/health/ready", handler
    finally:
        server.shutdown()


def test_gate_execs_only_after_ready(health_server: tuple[str, type[_Health]]) -> None:
    url, handler = health_server
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "diffuserve.deploy.gate", "--url", url, "--interval", "0.05", "--",
         sys.executable, "-c", "import time; print('exec at', time.monotonic())"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    exec_line = next(line for line in result.stdout.splitlines() if line.startswith("exec at"))
    assert float(exec_line.split()[-1]) >= handler.ready_after
    assert time.monotonic() - started < 20


def test_gate_gives_up_after_timeout() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "diffuserve.deploy.gate", "--url", "http://127.0.0.1:9/never", "--interval", "0.05",
         "--timeout", "0.5", "--", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "not ready after" in result.stdout


def test_nginx_writes_its_own_forwarded_headers_never_the_clients(env: pytest.MonkeyPatch) -> None:
    """The host and scheme the server writes into image URLs come from the connection nginx accepted: a
    client's X-Forwarded-Host/-Proto/-Prefix are replaced (an empty value drops the header)."""
    nginx = render(FrontConfig.from_env(front_port=18080, server_port=18081)).nginx_conf.read_text()
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in nginx
    assert "proxy_set_header X-Forwarded-Host $http_host;" in nginx
    assert 'proxy_set_header X-Forwarded-Prefix "";' in nginx
    assert "$http_x_forwarded_host" not in nginx and "$http_x_forwarded_proto" not in nginx
