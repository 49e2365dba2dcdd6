"""Renders the front's concrete nginx and supervisord configs from the environment into one run folder."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffuserve.config import Settings
from diffuserve.deploy import DEPLOY_DIR

PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
# Characters a path or host may hold and still sit unquoted in both nginx and supervisord configs.
SAFE_WORD = re.compile(r"^[A-Za-z0-9_./:+@-]+$")
# Bearer keys go inside a quoted nginx map key: no quotes, backslashes, `$` or whitespace.
SAFE_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{8,256}$")
READY_PATH = "/v2/health/ready"

# The front's own environment variables (the server's are in diffuserve.config.Settings).
FRONT_ENV_HELP: dict[str, str] = {
    "PORT": "public port nginx listens on (default 8000); the model server gets SERVER_PORT",
    "FRONT_HOST": "address nginx binds (default 0.0.0.0: Modal and Docker route to the container's port)",
    "SERVER_PORT": "loopback port of the model server behind nginx (default 8001)",
    "DIFFUSERVE_RUN_DIR": "where the rendered configs, sockets, pid files and nginx temp files go (default /run/diffuserve)",
    "DIFFUSERVE_LOG_DIR": "write model/nginx/supervisord logs there instead of the container's stdout",
    "FRONT_AUTH": "1/0: nginx checks bearer keys from API_KEYS/AUTH_TOKEN before the server (default 1 when keys are set)",
    "NGINX_WORKERS": "nginx worker processes (default 2; proxying images needs few)",
    "NGINX_USER": "user nginx workers run as when started by root (default: no switch)",
    "NGINX_BIN": "nginx executable (default: found on PATH or /usr/sbin/nginx)",
    "DIFFUSERVE_BIN": "diffuserve executable for the model server (default: the one beside this Python)",
    "UPSTREAM_KEEPALIVE": "idle keep-alive connections nginx keeps to the server (default 32)",
}


class FrontConfigError(ValueError):
    """A setting the front cannot use; the message names the environment variable."""


@dataclass(frozen=True)
class FrontConfig:
    """Everything the two rendered files need; built from the environment by `from_env`."""

    run_dir: Path
    port: int = 8000
    listen_host: str = "0.0.0.0"
    server_port: int = 8001
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    api_keys: tuple[str, ...] = ()
    front_auth: bool = True
    nginx_workers: int = 2
    nginx_user: str | None = None
    upstream_keepalive: int = 32
    log_dir: Path | None = None
    nginx_bin: str = "/usr/sbin/nginx"
    diffuserve_cmd: tuple[str, ...] = field(default_factory=lambda: default_diffuserve_command())
    python: str = sys.executable

    def __post_init__(self) -> None:
        for name, port in (("PORT", self.port), ("SERVER_PORT", self.server_port)):
            if not 0 < port < 65536:
                raise FrontConfigError(f"{name} must be 1..65535, got {port}")
        if self.port == self.server_port:
            raise FrontConfigError(f"PORT and SERVER_PORT must differ (both {self.port})")
        if self.max_body_bytes < 1024:
            raise FrontConfigError(f"MAX_BODY_BYTES must be >= 1024, got {self.max_body_bytes}")
        if self.request_timeout <= 0:
            raise FrontConfigError(f"REQUEST_TIMEOUT must be > 0, got {self.request_timeout}")
        if self.nginx_workers < 1:
            raise FrontConfigError(f"NGINX_WORKERS must be >= 1, got {self.nginx_workers}")
        if self.upstream_keepalive < 1:
            raise FrontConfigError(f"UPSTREAM_KEEPALIVE must be >= 1, got {self.upstream_keepalive}")
        for name, value in (
            ("DIFFUSERVE_RUN_DIR", str(self.run_dir)),
            ("DIFFUSERVE_LOG_DIR", str(self.log_dir or "")),
            ("FRONT_HOST", self.listen_host),
            ("NGINX_USER", self.nginx_user or ""),
            ("NGINX_BIN", self.nginx_bin),
        ):
            if value and not SAFE_WORD.match(value):
                raise FrontConfigError(
                    f"{name}={value!r} holds characters nginx/supervisord configs cannot take"
                )
        if not self.run_dir.is_absolute():
            raise FrontConfigError(f"DIFFUSERVE_RUN_DIR must be an absolute path, got {self.run_dir}")
        if self.nginx_auth:
            for key in self.api_keys:
                if not SAFE_KEY.match(key):
                    raise FrontConfigError(
                        "an API key holds characters nginx cannot compare safely (allowed: letters, digits, "
                        "._~+/=-, 8..256 long); use such keys or set FRONT_AUTH=0 to leave the check to the server"
                    )

    @property
    def nginx_auth(self) -> bool:
        return self.front_auth and bool(self.api_keys)

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}{READY_PATH}"

    @property
    def nginx_conf(self) -> Path:
        return self.run_dir / "nginx.conf"

    @property
    def supervisord_conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def read_timeout(self) -> str:
        # 30 s beyond the server's deadline, so the server's own 504 envelope wins the race.
        return f"{int(self.request_timeout) + 30}s"

    def model_command(self) -> list[str]:
        # Exec'd directly: its workers die with it (PR_SET_PDEATHSIG), so a restart finds no leftovers.
        return [*self.diffuserve_cmd, "serve", "--host", "127.0.0.1", "--port", str(self.server_port)]

    def nginx_command(self) -> list[str]:
        nginx = [self.nginx_bin, "-e", "stderr", "-c", str(self.nginx_conf)]
        return [self.python, "-m", "diffuserve.deploy.gate", "--url", self.ready_url, "--", *nginx]

    @classmethod
    def from_env(cls, **overrides: object) -> FrontConfig:
        """Read the front's variables plus the server's MAX_BODY_BYTES, REQUEST_TIMEOUT and API keys."""
        env = os.environ
        server = _server_settings()
        values: dict[str, object] = {
            "run_dir": Path(env.get("DIFFUSERVE_RUN_DIR") or "/run/diffuserve"),
            "port": _int(env, "PORT", 8000),
            "listen_host": env.get("FRONT_HOST") or "0.0.0.0",
            "server_port": _int(env, "SERVER_PORT", 8001),
            "max_body_bytes": server.max_body_bytes,
            "request_timeout": server.request_timeout,
            "api_keys": tuple(server.api_keys),
            "front_auth": (env.get("FRONT_AUTH") or "1").strip().lower() not in {"0", "false", "no", "off"},
            "nginx_workers": _int(env, "NGINX_WORKERS", 2),
            "nginx_user": env.get("NGINX_USER") or None,
            "upstream_keepalive": _int(env, "UPSTREAM_KEEPALIVE", 32),
            "log_dir": Path(env["DIFFUSERVE_LOG_DIR"]) if env.get("DIFFUSERVE_LOG_DIR") else None,
            "nginx_bin": env.get("NGINX_BIN") or shutil.which("nginx") or "/usr/sbin/nginx",
        }
        if env.get("DIFFUSERVE_BIN"):
            values["diffuserve_cmd"] = tuple(shlex.split(env["DIFFUSERVE_BIN"]))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def default_diffuserve_command() -> tuple[str, ...]:
    """The `diffuserve` beside this interpreter (a venv needs no PATH), else PATH, else this Python."""
    beside = Path(sys.executable).parent / "diffuserve"
    if beside.is_file() and os.access(beside, os.X_OK):
        return (str(beside),)
    found = shutil.which("diffuserve")
    if found:
        return (found,)
    return (sys.executable, "-c", "import sys; from diffuserve.cli import main; sys.exit(main())")


def _server_settings() -> Settings:
    """The server's own reading of MAX_BODY_BYTES, REQUEST_TIMEOUT and API_KEYS/AUTH_TOKEN: one source of truth."""
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise FrontConfigError(str(exc)) from exc


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise FrontConfigError(f"{name} must be an integer, got {raw!r}") from None


def fill(template: str, values: Mapping[str, str]) -> str:
    """Replace every @@NAME@@; an unknown name is an error, never a silently broken config."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder @@{name}@@ has no value")
        return values[name]

    return PLACEHOLDER.sub(replace, template)


def _supervisor_quote(argv: Sequence[str]) -> str:
    # supervisord splits `command` with shlex and expands %(name)s: quote for the first, escape % for the second.
    return shlex.join(argv).replace("%", "%%")


def nginx_values(cfg: FrontConfig) -> dict[str, str]:
    auth_map = ""
    auth_check = ""
    if cfg.nginx_auth:
        keys = "\n".join(f'        "Bearer {key}" 1;' for key in cfg.api_keys)
        auth_map = (
            "    # Bearer keys from API_KEYS/AUTH_TOKEN: nginx rejects bad keys before they reach the queue.\n"
            "    map $http_authorization $diffuserve_key_ok {\n"
            "        default 0;\n"
            f"{keys}\n"
            "    }\n"
        )
        auth_check = "            if ($diffuserve_key_ok = 0) {\n                return 401;\n            }"
    user = ""
    if cfg.nginx_user:
        user = f"user {cfg.nginx_user};"
    return {
        "WORKERS": str(cfg.nginx_workers),
        "USER_DIRECTIVE": user,
        "RUN_DIR": str(cfg.run_dir),
        "ERROR_LOG": "stderr",
        "ACCESS_LOG": "/dev/stdout",
        "MAX_BODY_BYTES": str(cfg.max_body_bytes),
        "BODY_BUFFER_BYTES": str(min(cfg.max_body_bytes, 1 << 20)),
        "AUTH_MAP": auth_map,
        "AUTH_CHECK": auth_check,
        "SERVER_PORT": str(cfg.server_port),
        "UPSTREAM_KEEPALIVE": str(cfg.upstream_keepalive),
        "UPSTREAM_KEEPALIVE_TIMEOUT": "60s",
        "LISTEN_HOST": cfg.listen_host,
        "PORT": str(cfg.port),
        "READ_TIMEOUT": cfg.read_timeout,
    }


def supervisord_values(cfg: FrontConfig) -> dict[str, str]:
    def log(name: str) -> str:
        return str(cfg.log_dir / f"{name}.log") if cfg.log_dir else "/dev/stdout"

    return {
        "RUN_DIR": str(cfg.run_dir),
        # Containers run as root; saying so explicitly silences supervisord's "running as root" CRIT line.
        "SUPERVISORD_USER": "user=root" if os.geteuid() == 0 else "",
        "SUPERVISORD_LOG": log("supervisord"),
        "MODEL_COMMAND": _supervisor_quote(cfg.model_command()),
        "MODEL_LOG": log("model"),
        "NGINX_COMMAND": _supervisor_quote(cfg.nginx_command()),
        "NGINX_LOG": log("nginx"),
        "NGINX_STOP_WAIT": "30",
    }


@dataclass(frozen=True)
class Rendered:
    nginx_conf: Path
    supervisord_conf: Path


def render(cfg: FrontConfig) -> Rendered:
    """Write nginx.conf and supervisord.conf into cfg.run_dir (0600: they may hold bearer keys)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    # nginx workers (maybe another user) need to traverse the run dir to reach their temp folders.
    os.chmod(cfg.run_dir, 0o755)
    (cfg.run_dir / "nginx-tmp").mkdir(exist_ok=True)
    if cfg.log_dir:
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
    nginx = fill((DEPLOY_DIR / "nginx.conf").read_text(), nginx_values(cfg))
    supervisord = fill((DEPLOY_DIR / "supervisord.conf").read_text(), supervisord_values(cfg))
    for path, text in ((cfg.nginx_conf, nginx), (cfg.supervisord_conf, supervisord)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o600)
    return Rendered(cfg.nginx_conf, cfg.supervisord_conf)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffuserve.deploy.render",
        description="Render the front's nginx.conf and supervisord.conf from the environment.",
        epilog="Environment: " + "; ".join(f"{k}: {v}" for k, v in FRONT_ENV_HELP.items()),
    )
    parser.add_argument(
        "--out", type=Path, help="run folder (default $DIFFUSERVE_RUN_DIR or /run/diffuserve)"
    )
    args = parser.parse_args(argv)
    try:
        cfg = FrontConfig.from_env(**({"run_dir": args.out.resolve()} if args.out else {}))
        rendered = render(cfg)
    except FrontConfigError as exc:
        print(f"diffuserve front: {exc}", file=sys.stderr)
        return 2
    print(f"rendered {rendered.nginx_conf} and {rendered.supervisord_conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
