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
from typing import Any, ClassVar

from diffuserve.config import Settings
from diffuserve.deploy import DEPLOY_DIR
from diffuserve.envsettings import EnvSettings, setting

PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
# Characters a path or host may hold and still sit unquoted in both nginx and supervisord configs.
SAFE_WORD = re.compile(r"^[A-Za-z0-9_./:+@-]+$")
# Bearer keys go inside a quoted nginx map key: no quotes, backslashes, `$` or whitespace.
SAFE_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{8,256}$")
READY_PATH = "/v2/health/ready"


class FrontConfigError(ValueError):
    """A setting the front cannot use; the message names the environment variable."""


class FrontSettings(EnvSettings):
    """The front's own variables (the model server's are diffuserve.config.Settings).

    Two ports, two names: nginx listens on the public FRONT_PORT (a platform's PORT counts when FRONT_PORT is
    unset); the model server listens on SERVER_PORT, given to it as its --port flag, so PORT never moves it.
    """

    error_class: ClassVar[type[ValueError]] = FrontConfigError

    run_dir: Path = setting(
        Path("/run/diffuserve"),
        "DIFFUSERVE_RUN_DIR",
        help="where the rendered configs, sockets, pid files and nginx temp files go",
        flags=("--out",),
    )
    front_port: int = setting(8000, "FRONT_PORT", "PORT", help="public port nginx listens on", ge=1, le=65535)
    front_host: str = setting(
        "0.0.0.0",
        "FRONT_HOST",
        help="address nginx binds (0.0.0.0: Modal and Docker route to the container's port)",
    )
    server_port: int = setting(
        8001, "SERVER_PORT", help="loopback port of the model server behind nginx", ge=1, le=65535
    )
    front_auth: bool = setting(
        True,
        "FRONT_AUTH",
        help="nginx checks the bearer keys of API_KEYS/AUTH_TOKEN before the server (when keys are set)",
    )
    nginx_workers: int = setting(
        2, "NGINX_WORKERS", help="nginx worker processes (proxying images needs few)", ge=1
    )
    nginx_user: str | None = setting(
        None, "NGINX_USER", help="user nginx workers run as when started by root (default: no switch)"
    )
    nginx_bin: str | None = setting(
        None, "NGINX_BIN", help="nginx executable", shown_default="found on PATH, else /usr/sbin/nginx"
    )
    diffuserve_bin: str | None = setting(
        None,
        "DIFFUSERVE_BIN",
        help="diffuserve command for the model server",
        shown_default="the one beside this Python",
    )
    upstream_keepalive: int = setting(
        32, "UPSTREAM_KEEPALIVE", help="idle keep-alive connections nginx keeps to the server", ge=1
    )
    log_dir: Path | None = setting(
        None,
        "DIFFUSERVE_LOG_DIR",
        help="write model/nginx/supervisord logs there",
        shown_default="the container's stdout",
    )


@dataclass(frozen=True)
class FrontConfig:
    """Everything the two rendered files need: the front's settings plus the server's body limit, deadline
    and keys; built by `from_env`."""

    run_dir: Path
    front_port: int = 8000
    front_host: str = "0.0.0.0"
    server_port: int = 8001
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
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
        # Ranges are the settings model's job; here only what needs two values or the rendered text.
        if self.front_port == self.server_port:
            raise FrontConfigError(f"FRONT_PORT/PORT and SERVER_PORT must differ (both {self.front_port})")
        if self.max_body_bytes < 1024:
            raise FrontConfigError(f"MAX_BODY_BYTES must be >= 1024 for the front, got {self.max_body_bytes}")
        for name, value in (
            ("DIFFUSERVE_RUN_DIR", str(self.run_dir)),
            ("DIFFUSERVE_LOG_DIR", str(self.log_dir or "")),
            ("FRONT_HOST", self.front_host),
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
    def from_env(cls, **overrides: Any) -> FrontConfig:
        """The front's settings (env, then the overrides that are not None) plus the server's own reading of
        MAX_BODY_BYTES, MAX_UPLOAD_BYTES, REQUEST_TIMEOUT and API_KEYS/AUTH_TOKEN: one source of truth for both."""
        return cls.from_settings(FrontSettings.from_env(**overrides))

    @classmethod
    def from_settings(cls, front: FrontSettings) -> FrontConfig:
        server = _server_settings()
        values = front.model_dump(exclude={"nginx_bin", "diffuserve_bin"})
        return cls(
            **values,
            max_body_bytes=server.max_body_bytes,
            max_upload_bytes=server.max_upload_bytes,
            request_timeout=server.request_timeout,
            api_keys=tuple(server.api_keys),
            nginx_bin=front.nginx_bin or shutil.which("nginx") or "/usr/sbin/nginx",
            diffuserve_cmd=(
                tuple(shlex.split(front.diffuserve_bin))
                if front.diffuserve_bin
                else default_diffuserve_command()
            ),
        )


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
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise FrontConfigError(str(exc)) from exc


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
        "MAX_UPLOAD_BYTES": str(cfg.max_upload_bytes),
        "BODY_BUFFER_BYTES": str(min(cfg.max_body_bytes, 1 << 20)),
        "AUTH_MAP": auth_map,
        "AUTH_CHECK": auth_check,
        "SERVER_PORT": str(cfg.server_port),
        "UPSTREAM_KEEPALIVE": str(cfg.upstream_keepalive),
        "UPSTREAM_KEEPALIVE_TIMEOUT": "60s",
        "LISTEN_HOST": cfg.front_host,
        "PORT": str(cfg.front_port),
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


def add_front_arguments(parser: argparse.ArgumentParser) -> None:
    FrontSettings.add_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffuserve.deploy.render",
        description=(
            "Render the front's nginx.conf and supervisord.conf. Every flag also reads an environment "
            "variable (shown in brackets); MAX_BODY_BYTES, MAX_UPLOAD_BYTES, REQUEST_TIMEOUT and API_KEYS/AUTH_TOKEN "
            "are the server's settings (diffuserve serve --help), read here too."
        ),
    )
    add_front_arguments(parser)
    return render_from_args(parser.parse_args(argv))


def render_from_args(args: argparse.Namespace) -> int:
    # A folder given on the command line may be relative to where the command runs.
    out = Path(args.run_dir).resolve() if getattr(args, "run_dir", None) else None
    try:
        front = FrontSettings.from_args(args, run_dir=out)
        rendered = render(FrontConfig.from_settings(front))
    except FrontConfigError as exc:
        print(f"diffuserve front: {exc}", file=sys.stderr)
        return 2
    print(f"rendered {rendered.nginx_conf} and {rendered.supervisord_conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
