"""Memory snapshots and the compile cache on Modal, without credentials: the snapshot options on the class Modal
builds, which hooks Modal runs before and after a snapshot, those hooks driving a stand-in front, and the plan
that `deploy modal --dry-run` prints."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from diffuserve.cli import main as cli_main
from diffuserve.deploy.modal_plan import COMPILE_CACHE, COMPILE_DIR, VOLUME_MOUNT, ModalPlan, PlanError
from tests.unit import test_modal_app as base
from tests.unit.test_modal_app import Recorder, load_app, set_plan

modal = pytest.importorskip("modal", reason="modal is a dev dependency; install with pip install -e '.[dev]'")
from modal._partial_function import (  # noqa: E402  (after the importorskip above)
    _find_callables_for_obj,
    _find_partial_methods_for_user_cls,
    _PartialFunctionFlags,
)

clean_env = base.clean_env  # the same fixture: no plan variables or Modal credentials from the shell

SAVED = "/vol/diffuserve/compile/key.bin"
WARM = {
    "status": "ready",
    "workers": [{"id": 0, "state": "ready", "warm_batch_sizes": [1, 2, 3, 4], "compile_cache": SAVED}],
}
# Every size warm, the compile artefacts still being written.
WARM_SAVING = {"status": "ready", "workers": [{"id": 0, "state": "ready", "warm_batch_sizes": [1, 2, 3, 4]}]}
# Ready after its largest batch size; the smaller ones still to warm (compiled code is per batch size).
READY_WARMING = {
    "status": "ready",
    "workers": [{"id": 0, "state": "ready", "phase": "warming batch size 3", "warm_batch_sizes": [4]}],
}
LOADING = {"status": "loading", "workers": [{"id": 0, "state": "starting", "phase": "loading"}]}


def deployed_options(app: ModuleType) -> dict[str, Any]:
    """The snapshot settings the Function object Modal built for the Server class will deploy: its loader holds
    them and writes them into the definition it sends (checkpointing_enabled, experimental_options)."""
    from modal._utils.async_utils import synchronizer

    load = synchronizer._translate_in(app.Server._get_class_service_function())._load
    cells = dict(
        zip(load.__code__.co_freevars, [cell.cell_contents for cell in load.__closure__], strict=True)
    )
    return {name: cells[name] for name in ("enable_memory_snapshot", "experimental_options")}


def hooks(app: ModuleType, flag: int) -> list[str]:
    """The Server methods Modal's container runtime picks for a lifecycle step, in the order it runs them."""
    return list(_find_partial_methods_for_user_cls(app.Server._get_user_cls(), flag))


def test_default_plan_takes_no_snapshot(clean_env: pytest.MonkeyPatch) -> None:
    recorder = Recorder(clean_env)
    app = load_app()
    kwargs = recorder.kwargs_for("Server")
    assert kwargs["enable_memory_snapshot"] is False
    assert "enable_gpu_snapshot" not in kwargs["experimental_options"]
    assert "TORCHINDUCTOR_COMPILE_THREADS" not in kwargs["env"]
    assert deployed_options(app) == {"enable_memory_snapshot": False, "experimental_options": {}}
    # Nothing runs before a snapshot; after the start, `check` (in definition order, as Modal calls them).
    assert hooks(app, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT) == []
    assert hooks(app, _PartialFunctionFlags.ENTER_POST_SNAPSHOT) == ["start", "check"]
    assert hooks(app, _PartialFunctionFlags.EXIT) == ["stop"]


def test_gpu_snapshot_plan_snapshots_the_started_server(clean_env: pytest.MonkeyPatch) -> None:
    set_plan(clean_env, ModalPlan(gpu_snapshot=True))
    recorder = Recorder(clean_env)
    app = load_app()
    kwargs = recorder.kwargs_for("Server")
    assert kwargs["enable_memory_snapshot"] is True
    assert kwargs["experimental_options"] == {"enable_gpu_snapshot": True}
    assert deployed_options(app) == {
        "enable_memory_snapshot": True,
        "experimental_options": {"enable_gpu_snapshot": "True"},  # Modal sends its options as strings
    }
    # Modal's advice for torch.compile under GPU snapshots.
    assert kwargs["env"]["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    # The container rebuilds the same plan from its env: the class it imports has the same snapshot options.
    assert ModalPlan.from_env(kwargs["env"]).gpu_snapshot is True
    assert hooks(app, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT) == ["start"]
    assert hooks(app, _PartialFunctionFlags.ENTER_POST_SNAPSHOT) == ["check"]
    assert hooks(app, _PartialFunctionFlags.EXIT) == ["stop"]
    # A memory snapshot changes nothing Modal routes or scales by.
    assert base.service_info(app).gpus == [("H100", 1)]
    assert set(base.service_info(app).method_details) == {"serve"}


def test_gpu_snapshot_needs_one_gpu(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ModalPlan(gpu="H100:1", gpu_snapshot=True).gpu_count == 1
    with pytest.raises(PlanError, match="generally incompatible with multi-GPU code"):
        ModalPlan(gpu="H100:2", gpu_snapshot=True)
    assert cli_main(["deploy", "modal", "--dry-run", "--gpu", "A100:4", "--gpu-snapshot"]) == 2
    assert "--gpu-snapshot needs one GPU per container" in capsys.readouterr().err


def test_compile_artefacts_live_on_the_volume(clean_env: pytest.MonkeyPatch) -> None:
    """The server's cache dir in the container is where the plan says the compile artefacts are, under the
    Volume's mount, so what one container compiles the next one loads."""
    from diffuserve.config import Settings
    from diffuserve.engine.tiers.compile import compile_dir

    recorder = Recorder(clean_env)
    load_app()
    image_env = recorder.image_env[0]
    assert image_env["DIFFUSERVE_CACHE"] == COMPILE_CACHE
    assert Settings.from_env(image_env).resolved_cache_dir == COMPILE_CACHE
    assert compile_dir(COMPILE_CACHE) == Path(COMPILE_DIR)
    assert Path(COMPILE_DIR).is_relative_to(VOLUME_MOUNT)
    assert set(recorder.kwargs_for("Server")["volumes"]) == {VOLUME_MOUNT}


@pytest.mark.parametrize(
    ("argv", "present", "absent"),
    [
        (
            [],
            ["CPU memory: off, does not apply here", "GPU memory: off (--gpu-snapshot", "GPU_SNAPSHOT=0"],
            ["CPU + GPU memory: on"],
        ),
        (
            ["--gpu-snapshot"],
            ["CPU + GPU memory: on (a Modal alpha)", "once every batch size is warm", "GPU_SNAPSHOT=1"],
            ["GPU memory: off", "`modal serve` makes none"],
        ),
        (["--gpu-snapshot", "--serve"], ["`modal serve` makes none", "modal serve"], []),
    ],
    ids=["default", "gpu-snapshot", "gpu-snapshot-serve"],
)
def test_dry_run_says_which_snapshot_and_where_compiled_artefacts_live(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    present: list[str],
    absent: list[str],
) -> None:
    assert cli_main(["deploy", "modal", "--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    assert f"compile:     {COMPILE_DIR} on the volume" in out
    assert "https://modal.com/docs/guide/memory-snapshots" in out
    for text in present:
        assert text in out
    for text in absent:
        assert text not in out


# -- the hooks' helpers against stand-ins for the server and nginx -------------------------------------------


class Readiness:
    """A stand-in model server whose /v2/health/ready answers the bodies it is given, one per request (the
    last one repeats): 200 for a ready body, 503 otherwise, as the server does."""

    def __init__(self, *bodies: dict[str, Any]) -> None:
        self.bodies = list(bodies)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = owner.bodies.pop(0) if len(owner.bodies) > 1 else owner.bodies[0]
                data = json.dumps(body).encode()
                self.send_response(200 if body["status"] == "ready" else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v2/health/ready"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> Readiness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on, as nginx once the gate has opened it."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


@pytest.fixture
def front() -> Iterator[subprocess.Popen[bytes]]:
    """A live process standing in for supervisord."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def test_every_size_warm_reads_the_readiness_body() -> None:
    app = load_app()
    assert app.every_size_warm(WARM)
    assert not app.every_size_warm(WARM_SAVING)
    assert app.every_size_warm({**WARM, "workers": [{**WARM_SAVING["workers"][0], "compile_cache": None}]})
    assert not app.every_size_warm(READY_WARMING)
    assert not app.every_size_warm(LOADING)
    assert not app.every_size_warm({"status": "ready", "workers": []})


def test_wait_for_every_size_waits_past_ready(front: subprocess.Popen[bytes], listening: int) -> None:
    app = load_app()
    with Readiness(LOADING, READY_WARMING, READY_WARMING, WARM_SAVING, WARM) as server:
        app.wait_until_serving(
            front, every_size=True, timeout=10, url=server.url, port=listening, interval=0.01
        )
        assert server.bodies == [WARM]  # it asked until the warm answer, not just until the first 200


def test_wait_for_ready_returns_at_the_first_ready_answer(
    front: subprocess.Popen[bytes], listening: int
) -> None:
    app = load_app()
    with Readiness(LOADING, READY_WARMING, WARM) as server:
        app.wait_until_serving(
            front, every_size=False, timeout=10, url=server.url, port=listening, interval=0.01
        )
        assert server.bodies == [WARM]  # it returned at the first ready answer, before the warm one


def test_wait_needs_nginx_listening(front: subprocess.Popen[bytes]) -> None:
    app = load_app()
    with Readiness(WARM) as server, pytest.raises(TimeoutError, match="not ready after"):
        app.wait_until_serving(
            front, every_size=False, timeout=0.2, url=server.url, port=free_port(), interval=0.01
        )


def test_wait_fails_fast_on_a_failed_server_or_a_dead_front(
    front: subprocess.Popen[bytes], listening: int
) -> None:
    app = load_app()
    failed = Readiness({"status": "failed", "error": "CUDA out of memory", "workers": []})
    with failed, pytest.raises(RuntimeError, match="failed to start: CUDA out of memory"):
        app.wait_until_serving(front, every_size=True, timeout=10, url=failed.url, port=listening)
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(RuntimeError, match=r"supervisord exited \(3\)"):
        app.wait_until_serving(dead, every_size=False, timeout=10, url="http://127.0.0.1:9/", port=listening)


def test_stop_front_terminates_then_kills() -> None:
    app = load_app()
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    app.stop_front(polite, timeout=10)
    assert polite.returncode == -signal.SIGTERM  # supervisord's signal to stop its programs in order
    ignores_term = (
        "import signal as s, time; s.signal(s.SIGTERM, s.SIG_IGN); print(flush=True); time.sleep(60)"
    )
    stubborn = subprocess.Popen([sys.executable, "-c", ignores_term], stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout is not None
        stubborn.stdout.readline()  # its handler is in place
        app.stop_front(stubborn, timeout=0.3)
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()
    app.stop_front(None)  # a container whose start failed before the front existed


# -- the hooks end to end, in the order Modal's container runtime calls them ---------------------------------

FAKE_SUPERVISORD = """\
    import json, signal, socket, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from pathlib import Path

    nginx = socket.create_server(("127.0.0.1", {front_port}))
    bodies = {bodies!r}
    log = Path({log!r})

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies.pop(0) if len(bodies) > 1 else bodies[0]
            with log.open("a") as answered:
                answered.write(json.dumps(body) + "\\n")
            data = json.dumps(body).encode()
            self.send_response(200 if body["status"] == "ready" else 503)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    def stop(signum, frame):
        log.open("a").write("TERM\\n")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    HTTPServer(("127.0.0.1", {server_port}), Ready).serve_forever()
"""


def run_hooks(server: Any, flag: int) -> None:
    """One lifecycle step's hooks, found and called as Modal's container runtime does."""
    for hook in _find_callables_for_obj(server, flag).values():
        hook()


def answers(log: Path) -> list[Any]:
    """What the stand-in server answered, in order, and TERM once it was told to stop."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [line if line == "TERM" else json.loads(line) for line in lines]


@pytest.mark.parametrize("gpu_snapshot", [False, True], ids=["no-snapshot", "gpu-snapshot"])
def test_hooks_start_wait_and_stop_the_front(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, gpu_snapshot: bool
) -> None:
    """Pre-snapshot hooks, then post-snapshot hooks, then exit hooks, as Modal runs a container: the front starts
    once; before a snapshot the hooks wait until every batch size is warm, otherwise until the first ready
    answer; the exit hook stops supervisord with TERM."""
    front_port, server_port = free_port(), free_port()
    set_plan(clean_env, ModalPlan(gpu_snapshot=gpu_snapshot, port=front_port, startup_timeout=30))
    app = load_app()
    log = tmp_path / "answered"
    script = tmp_path / "diffuserve-start"
    body = FAKE_SUPERVISORD.format(
        front_port=front_port, server_port=server_port, bodies=[LOADING, READY_WARMING, WARM], log=str(log)
    )
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    clean_env.setattr(app, "START_SCRIPT", str(script))
    clean_env.setattr(app, "READY_URL", f"http://127.0.0.1:{server_port}/v2/health/ready")
    clean_env.setattr(app, "POLL_S", 0.02)
    server = app.Server._get_user_cls()()
    try:
        run_hooks(server, _PartialFunctionFlags.ENTER_PRE_SNAPSHOT)
        # What a snapshot would hold: the server warm at every batch size, or (without one) nothing started.
        assert answers(log) == ([LOADING, READY_WARMING, WARM] if gpu_snapshot else [])
        run_hooks(server, _PartialFunctionFlags.ENTER_POST_SNAPSHOT)
        assert server.front.poll() is None and app.port_open(front_port)
        # Without a snapshot the first 200 opens the container, as it opens nginx's gate: a worker warms its
        # smaller batch sizes between batches.
        assert answers(log)[:2] == [LOADING, READY_WARMING]
        run_hooks(server, _PartialFunctionFlags.EXIT)
        assert server.front.returncode == 0 and answers(log)[-1] == "TERM"
    finally:
        if server.__dict__.get("front") is not None and server.front.poll() is None:
            server.front.kill()
            server.front.wait()
