"""The Modal app without credentials: generated class and function specs, flag validation, and no secrets in
deploy/. The memory snapshot options and the front's start-up hooks: test_modal_snapshots.py."""

from __future__ import annotations

import importlib.util
import re
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from diffuserve.cli import main as cli_main
from diffuserve.deploy import DEPLOY_DIR
from diffuserve.deploy.modal_plan import ENV_PREFIX, ModalPlan, PlanError

modal = pytest.importorskip("modal", reason="modal is a dev dependency; install with pip install -e '.[dev]'")

APP_FILE = DEPLOY_DIR / "modal_app.py"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No plan variables and no Modal credentials leak in from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name.startswith("MODAL_TOKEN"):
            monkeypatch.delenv(name)
    return monkeypatch


IMAGE_METHODS = (
    "apt_install",
    "uv_pip_install",
    "pip_install",
    "env",
    "add_local_file",
    "add_local_dir",
    "run_commands",
    "entrypoint",
)


class Recorder:
    """Wraps App.cls, App.function and the Image builder methods to see exactly what modal_app passes to Modal."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.classes: list[dict[str, Any]] = []
        self.functions: list[dict[str, Any]] = []
        self.image_calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        for name, calls in (("cls", self.classes), ("function", self.functions)):
            monkeypatch.setattr(modal.App, name, self._record(getattr(modal.App, name), calls))
        for name in IMAGE_METHODS:
            monkeypatch.setattr(modal.Image, name, self._wrap(name, getattr(modal.Image, name)))

    @staticmethod
    def _record(real: Any, calls: list[dict[str, Any]]) -> Any:
        def decorator(self_app: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return real(self_app, *args, **kwargs)

        return decorator

    def _wrap(self, name: str, real: Any) -> Any:
        def method(self_image: Any, *args: Any, **kwargs: Any) -> Any:
            self.image_calls.append((name, args, kwargs))
            return real(self_image, *args, **kwargs)

        return method

    @property
    def image_env(self) -> list[dict[str, str]]:
        return [dict(args[0]) for name, args, _ in self.image_calls if name == "env"]

    def calls(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for called, args, kwargs in self.image_calls if called == name]

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """What modal_app passed for its one class (`Server`) or its one function (`prefetch`)."""
        (kwargs,) = self.classes if name == "Server" else self.functions
        return kwargs


def service_info(app: ModuleType) -> Any:
    """The spec Modal built for the serving class (GPU, volumes, concurrency …): its service function's."""
    return app.Server._get_class_service_function().info()


def load_app(path: Path = APP_FILE) -> ModuleType:
    """Import the file the way `modal deploy path.py` does: as a top-level module."""
    name = f"modal_app_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def set_plan(monkeypatch: pytest.MonkeyPatch, plan: ModalPlan) -> None:
    for key, value in plan.to_env().items():
        monkeypatch.setenv(key, value)


def test_autoscale_plan_reaches_the_function_spec(clean_env: pytest.MonkeyPatch) -> None:
    plan = ModalPlan(
        gpu="L40S",
        mode="autoscale",
        min_containers=1,
        max_containers=8,
        scaledown_window=120,
        model_batch=2,
        timeout=1800,
        startup_timeout=900,
        ephemeral_disk_gib=100,
        volume="my-cache",
        hf_secret="hf-token",
        api_key_secret="diffuserve-keys",
    )
    set_plan(clean_env, plan)
    recorder = Recorder(clean_env)
    app = load_app()

    info = service_info(app)
    assert info.gpus == [("L40S", 1)]
    assert info.timeout == 1800
    assert info.startup_timeout == 900
    assert info.ephemeral_disk_mib == 100 * 1024
    assert info.concurrency_info is not None
    # Concurrency follows the batch: target one batch, allow four queued.
    assert (info.concurrency_info.target_inputs, info.concurrency_info.max_inputs) == (2, 8)
    assert set(info.volumes) == {"/cache"}
    assert info.volumes["/cache"].name == "my-cache"
    assert set(info.method_details) == {"serve"}  # the one web endpoint
    assert "modal.Secret.from_name('hf-token')" in info.secrets
    assert "modal.Secret.from_name('diffuserve-keys')" in info.secrets

    serve_kwargs = recorder.kwargs_for("Server")
    assert (serve_kwargs["min_containers"], serve_kwargs["max_containers"]) == (1, 8)
    assert serve_kwargs["scaledown_window"] == 120
    assert serve_kwargs["env"]["MODEL_BATCH"] == "2"
    # The container rebuilds the same plan from the variables it receives.
    assert ModalPlan.from_env(serve_kwargs["env"]) == plan

    prefetch = app.prefetch.info()
    assert prefetch.gpus == []  # downloading needs no GPU
    assert prefetch.volumes["/cache"].name == "my-cache"
    assert {
        "HF_HOME": "/cache/huggingface",
        "DIFFUSERVE_CACHE": "/cache/diffuserve",
        "IMAGE_STORE_DIR": "/tmp/diffuserve-images",  # off the shared Volume
    }.items() <= recorder.image_env[0].items()


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (ModalPlan(), (1, 1, None)),
        (ModalPlan(mode="fixed", min_containers=8, max_containers=8), (8, 8, None)),
        (ModalPlan(mode="autoscale", min_containers=0, max_containers=4), (0, 4, 300)),
    ],
    ids=["single", "fixed", "autoscale-default-window"],
)
def test_scaling_modes(
    clean_env: pytest.MonkeyPatch, plan: ModalPlan, expected: tuple[int, int, int | None]
) -> None:
    set_plan(clean_env, plan)
    recorder = Recorder(clean_env)
    app = load_app()
    kwargs = recorder.kwargs_for("Server")
    assert (kwargs["min_containers"], kwargs["max_containers"], kwargs["scaledown_window"]) == expected
    assert service_info(app).gpus == [("H100", 1)]


def test_written_app_carries_the_plan_without_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code = cli_main(
        [
            "deploy",
            "modal",
            "--mode",
            "fixed",
            "--containers",
            "3",
            "--gpu",
            "B200",
            "--write-app",
            str(tmp_path),
        ]
    )
    assert code == 0
    written = tmp_path / "modal_app.py"
    text = written.read_text()
    assert (
        "PLAN = ModalPlan(\n" in text and '    gpu="B200",\n' in text and "from_env(os.environ)" not in text
    )
    recorder = Recorder(clean_env)
    app = load_app(written)
    assert service_info(app).gpus == [("B200", 1)]
    kwargs = recorder.kwargs_for("Server")
    assert (kwargs["min_containers"], kwargs["max_containers"]) == (3, 3)
    # Its plan no longer comes from flags, so the CLI refuses it rather than ignore them silently.
    assert cli_main(["deploy", "modal", "--app", str(written), "--dry-run"]) == 2


def test_image_installs_front_package_and_start_script(clean_env: pytest.MonkeyPatch) -> None:
    recorder = Recorder(clean_env)
    app = load_app()
    order = [name for name, _, _ in recorder.image_calls]
    ((apt_args, _),) = recorder.calls("apt_install")
    assert {"nginx", "supervisor"} <= set(apt_args)
    # Tests run from a checkout, so the image copies this source and installs it on top of its dependencies.
    root = app.find_source_root()
    assert root is not None
    ((deps, _),) = recorder.calls("uv_pip_install")
    assert any(dep.startswith("torch>=") for dep in deps) and any(dep.startswith("torchao") for dep in deps)
    local = recorder.calls("add_local_file") + recorder.calls("add_local_dir")
    assert {Path(args[0]).name for args, _ in local} == {"pyproject.toml", "README.md", "src", "start.sh"}
    # Modal rejects build steps after a non-copied local file: every one is copied, so `chmod` may follow.
    assert all(kwargs.get("copy") is True for _, kwargs in local)
    ((script_args, _),) = [(args, kwargs) for args, kwargs in local if Path(args[0]).name == "start.sh"]
    assert script_args[1] == app.START_SCRIPT
    installs = [args[0] for args, _ in recorder.calls("run_commands")]
    assert any("pip install --no-deps /opt/diffuserve" in cmd for cmd in installs)
    assert installs[-1] == f"chmod 0755 {app.START_SCRIPT}"
    # No image entrypoint: the `Server` class's enter hook starts the front, so a memory snapshot can hold it
    # (an entrypoint's processes would start before Modal's runner, with no say in what a snapshot captures).
    assert "entrypoint" not in order


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "autoscale", "--min", "5", "--max", "2"], "--min (5) cannot exceed --max (2)"),
        (
            ["--mode", "autoscale", "--max", "4", "--scaledown-window", "1"],
            "--scaledown-window must be 2..3600",
        ),
        (
            ["--mode", "autoscale", "--max", "4", "--scaledown-window", "3601"],
            "--scaledown-window must be 2..3600",
        ),
        (["--mode", "autoscale"], "--mode autoscale needs --max"),
        (["--mode", "fixed"], "--mode fixed needs --containers"),
        (["--mode", "fixed", "--containers", "4", "--max", "6"], "contradicts --min/--max"),
        (
            ["--mode", "fixed", "--containers", "2", "--scaledown-window", "60"],
            "only applies to --mode autoscale",
        ),
        (["--min", "2", "--max", "2"], "--mode single runs exactly one container"),
        (["--containers", "2"], "--containers only applies to --mode fixed"),
        (["--gpu", "X100"], "is not a Modal GPU type"),
        (["--gpu", "A10:8"], "must be 1..4 for A10"),
        (["--timeout", "0"], "--timeout must be 1..86400"),
        (["--startup-timeout", "90000"], "--startup-timeout must be 1..86400"),
        (["--model-batch", "0"], "--model-batch must be >= 1"),
        (["--max-inputs", "2", "--target-inputs", "3"], "cannot exceed --max-inputs"),
        (["--label", "My_Label"], "--label must be a DNS label"),
        (["--hf-secret", "bad name"], "--hf-secret must be"),
    ],
)
def test_flag_validation(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli_main(["deploy", "modal", "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffuserve deploy modal: ")
    assert message in err


def test_dry_run_prints_plan_and_commands(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "deploy",
        "modal",
        "--mode",
        "autoscale",
        "--min",
        "1",
        "--max",
        "8",
        "--gpu",
        "H100",
        "--prefetch",
    ]
    assert cli_main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1..8 containers, scale down after 300s idle" in out
    assert f"modal run {APP_FILE}::prefetch" in out
    assert f"modal deploy {APP_FILE}" in out
    assert "DIFFUSERVE_MODAL_MAX_CONTAINERS=8" in out


def test_deploy_without_token_fails_clearly(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from modal.config import config

    if config.get("token_id"):
        pytest.skip("a Modal token is configured here: this test must never deploy for real")
    assert cli_main(["deploy", "modal"]) == 2
    assert "no Modal token found: run `modal setup`" in capsys.readouterr().err


def test_plan_env_round_trip_and_bad_values() -> None:
    plan = ModalPlan(mode="autoscale", min_containers=0, max_containers=3, scaledown_window=60, offline=True)
    assert ModalPlan.from_env(plan.to_env()) == plan
    assert plan.server_env()["HF_HUB_OFFLINE"] == "1"
    # The server gives up before Modal's 150 s proxy limit turns the request into a 303.
    assert int(plan.server_env()["REQUEST_TIMEOUT"]) < 150
    with pytest.raises(
        PlanError, match=r"DIFFUSERVE_MODAL_MAX_CONTAINERS \(--max\): Input should be a valid integer.*'many'"
    ):
        ModalPlan.from_env({"DIFFUSERVE_MODAL_MODE": "autoscale", "DIFFUSERVE_MODAL_MAX_CONTAINERS": "many"})
    # A mistyped boolean is an error, never a silent "off".
    with pytest.raises(
        PlanError, match=r"DIFFUSERVE_MODAL_OFFLINE \(--offline\): Input should be a valid boolean"
    ):
        ModalPlan.from_env({"DIFFUSERVE_MODAL_OFFLINE": "ture"})
    tiered = ModalPlan.from_env({"DIFFUSERVE_MODAL_MODEL_SIZE": "s"})
    assert tiered.server_env()["MODEL_SIZE"] == "S" and ModalPlan.from_env(tiered.to_env()) == tiered


# Token shapes of the services this app touches, and account-specific endpoints.
SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face token
    re.compile(r"\b(ak|as|wk|ws)-[A-Za-z0-9]{16,}"),  # Modal token id / secret
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style API key
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"https?://[a-z0-9-]+--[a-z0-9-]+\.modal\.run"),  # a workspace's endpoint URL
    re.compile(r"(?i)(token|secret|password|api_key)\s*[=:]\s*['\"][^'\"\s]{8,}['\"]"),
]


def test_deploy_folder_holds_no_secret_or_account_name() -> None:
    files = [p for p in DEPLOY_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # The Dockerfile lives at the repository's root (it builds from the whole checkout), not in the package.
    assert {"modal_app.py", "start.sh", "nginx.conf", "supervisord.conf"} <= {p.name for p in files}
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            match = pattern.search(text)
            assert match is None, (
                f"{path.name} holds something secret-looking: {match.group(0) if match else ''}"
            )


def test_local_tokens_never_reach_the_image_or_function_env(clean_env: pytest.MonkeyPatch) -> None:
    fake = {
        "HF_TOKEN": "hf_" + "x" * 30,
        "HUGGINGFACE_ACCESS_TOKEN": "hf_" + "y" * 30,
        "API_KEYS": "sk-" + "z" * 30,
        "AUTH_TOKEN": "tok-" + "w" * 30,
    }
    for key, value in fake.items():
        clean_env.setenv(key, value)
    recorder = Recorder(clean_env)
    load_app()
    seen = repr(recorder.classes) + repr(recorder.functions) + repr(recorder.image_env)
    for key, value in fake.items():
        assert value not in seen, f"{key} from the deploying shell leaked into the app"
    for env in recorder.image_env:
        assert not set(env) & set(fake), "token variables must come from modal.Secret, not the image"


@pytest.mark.filterwarnings("ignore:The prefetch function is executing locally")
def test_prefetch_pulls_through_the_hub_and_commits_the_volume(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The prefetch step's own code, run locally: hub.pull fetches (with the secret's token and a progress log),
    and the Volume is committed even when the pull fails, so a second run resumes the parts it kept."""
    import types

    import diffuserve.hub

    set_plan(clean_env, ModalPlan(model_repo="org/model"))
    clean_env.setenv("HF_TOKEN", "hf_from_secret")
    app = load_app()
    commits: list[int] = []
    clean_env.setattr(app, "hf_cache", types.SimpleNamespace(commit=lambda: commits.append(1)))
    clean_env.setattr(app, "COMPILE_CACHE", str(tmp_path / "compile"))
    calls: list[tuple[str, str | None]] = []

    def fake_pull(
        repo: str, *, revision: str | None = None, token: str | None = None, progress: Any = None
    ) -> Path:
        calls.append((repo, token))
        assert callable(progress)
        return Path("/cache/huggingface/hub/models--org--model/snapshots/abc")

    clean_env.setattr(diffuserve.hub, "pull", fake_pull)
    assert app.prefetch.local() == (
        "org/model cached at /cache/huggingface/hub/models--org--model/snapshots/abc on volume diffuserve-hf-cache"
    )
    assert calls == [("org/model", "hf_from_secret")] and commits == [1]

    def failing_pull(repo: str, **kwargs: Any) -> Path:
        raise diffuserve.hub.PullError("disk full")

    clean_env.setattr(diffuserve.hub, "pull", failing_pull)
    with pytest.raises(diffuserve.hub.PullError):
        app.prefetch.local()
    assert commits == [1, 1]
