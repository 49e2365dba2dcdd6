"""`diffuserve bench` end to end: a real sweep against a spawned server on the built-in model, and its errors."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from diffuserve.bench.server import free_port
from diffuserve.config import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]

ITERATIONS = 8
USERS = (1, 4)
# The built-in model at a small size and few steps: the test checks the bench's bookkeeping, not the model's
# speed, and stays well under a minute on a shared CPU (most of it is the server's start-up).
PAYLOAD = ("--size", "64x64", "--steps", "2")


def bench_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffuserve.cli", "bench", *args]


def bench(*args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    """Run the command in a process of its own, as users run it: locust's gevent patching must not reach the
    test process. `timeout` stays well under the test's: a run that hangs gets SIGTERM first, so it stops
    the server it spawned, and only then SIGKILL (pytest-timeout's kill would orphan the server)."""
    proc = subprocess.Popen(
        bench_command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"`diffuserve bench` ran past {timeout:g} s; stopped it\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def aggregated_row(stats_csv: Path) -> dict[str, str]:
    with stats_csv.open(newline="") as fh:
        return next(row for row in csv.DictReader(fh) if row["Name"] == "Aggregated")


@pytest.mark.timeout(150)
def test_two_step_sweep_against_spawned_server(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = bench(
        "--spawn-server",
        "--users",
        ",".join(map(str, USERS)),
        "--iterations",
        str(ITERATIONS),
        "--output",
        str(out),
        "--no-progress",
        *PAYLOAD,
    )
    server_log = out / "server.log"
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{server_log.read_text()[-3000:]}"

    summary = json.loads((out / "summary.json").read_text())
    # The spawned server runs the default built-in model; its served name starts with the model id.
    assert summary["model"].startswith(f"{DEFAULT_MODEL}-")
    assert (summary["options"]["size"], summary["options"]["steps"]) == ("64x64", 2)
    assert summary["versions"]["locust"]
    steps = summary["steps"]
    assert [s["users"] for s in steps] == list(USERS)
    for step in steps:
        users = step["users"]
        # Client view: every request counted once, all succeeded, one image each.
        assert (step["requests"], step["failures"], step["images"]) == (ITERATIONS, 0, ITERATIONS)
        lat = step["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert step["images_per_s"] == pytest.approx(step["images"] / step["duration_s"])
        assert sum(step["batch_sizes"].values()) == ITERATIONS
        assert max(int(size) for size in step["batch_sizes"]) <= users
        assert step["overhead_ms"]["count"] == ITERATIONS
        # The round trip holds the server's queue and inference time; what is left is small and positive-ish.
        assert -1.0 < step["overhead_ms"]["p50"] < lat["p50"]

        # Server view: the /metrics delta covers exactly this step (the warm-up request came before it).
        server = step["server"]
        assert server["requests_by_status"] == {"200": ITERATIONS}
        assert server["images_generated"] == ITERATIONS
        assert sum(server["batch_size_buckets"].values()) == server["batches"]
        assert server["mean_batch_size"] * server["batches"] == pytest.approx(ITERATIONS)
        assert server["mean_inference_ms"] > 0

        # Locust's own CSV, HTML report and the per-request samples agree on the count.
        step_dir = out / f"users-{users:03d}"
        row = aggregated_row(step_dir / "locust_stats.csv")
        assert (int(row["Request Count"]), int(row["Failure Count"])) == (ITERATIONS, 0)
        with (step_dir / "requests.csv").open(newline="") as fh:
            assert len(list(csv.DictReader(fh))) == ITERATIONS
        assert (step_dir / "locust_stats_history.csv").stat().st_size > 0
        assert "locust" in (step_dir / "report.html").read_text().lower()

    one_user = steps[0]
    assert one_user["server"]["mean_batch_size"] == pytest.approx(1.0)
    assert one_user["queue_ms"]["p50"] < 5.0  # a lone request never waits for a batch

    table = (out / "summary.md").read_text()
    for step in steps:
        assert f"| {step['users']} | {ITERATIONS} | 0 | {step['latency_ms']['p50']:.1f} |" in table
    assert "## Server view" in table

    for name in ("latency.png", "throughput.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            assert image.width > 300 and image.height > 200

    assert "users" in result.stdout and "reports in" in result.stdout


@pytest.mark.timeout(150)
def test_sigterm_stops_the_spawned_server_and_the_step(tmp_path: Path) -> None:
    """A SIGTERM to the command (a CI job cancelled, `timeout`) must not leave its server or locust behind."""
    out = tmp_path / "bench"
    stderr_path = tmp_path / "stderr.txt"
    args = ("--spawn-server", "--users", "1", "--duration", "60", "--output", str(out), "--no-progress")
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            bench_command(*args, *PAYLOAD), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        step_log = out / "users-001" / "locust.log"
        deadline = time.monotonic() + 90
        while not step_log.exists():
            assert proc.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, f"the sweep never started:\n{stderr_path.read_text()}"
            time.sleep(0.2)
        time.sleep(1.0)  # the locust step is running
        ready = re.search(r"server ready at (http://\S+)", stderr_path.read_text())
        assert ready, stderr_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=45) == 128 + signal.SIGTERM, stderr_path.read_text()
    finally:
        if proc.poll() is None:  # the test failed half-way: still stop the server before giving up
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert "diffuserve bench: terminated" in stderr_path.read_text()
    # The server (own session) and its workers are gone: nothing answers on its port.
    with pytest.raises(httpx.ConnectError):
        httpx.get(ready[1] + "/health/live", timeout=2.0)
    # Nor does the locust step process live on (its command line names the step's folder).
    marker = str(out).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert marker not in cmdline.read_bytes(), f"left running: {cmdline.read_bytes()!r}"
        except OSError:
            continue


def test_unreachable_server_exits_non_zero(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = bench(f"http://127.0.0.1:{port}", "--ready-timeout", "1", "--output", str(tmp_path), timeout=60)
    assert result.returncode == 1
    assert "unreachable" in result.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--users", "1,two"], "--users must be comma-separated integers"),
        (["--size", "big"], "--size must look like WIDTHxHEIGHT"),
        (["--users", "1,8", "--iterations", "4"], "leaves users idle"),
        (["--server-env", "MODEL_BATCH=2"], "--server-env only applies with --spawn-server"),
        (["--spawn-server"], "not both"),
    ],
)
def test_bad_flags_exit_2_with_a_reason(tmp_path: Path, args: list[str], message: str) -> None:
    result = bench("http://127.0.0.1:9", *args, "--output", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
