"""The sweep: for each user count, scrape /metrics, run one locust step in a child process, scrape again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from diffuserve.bench.metrics import delta_from_text
from diffuserve.bench.options import LoadOptions
from diffuserve.bench.server import fetch_metrics
from diffuserve.bench.summary import SAMPLES_FILE, StepSummary, read_samples, summarize_step


class StepError(RuntimeError):
    """A locust step process failed (not a failed request: those are results)."""


@dataclass
class SweepPlan:
    users: list[int]
    options: LoadOptions  # url and model resolved; iterations unset (per step, below)
    output: Path
    iterations: int | None = None  # requests per step; None with duration: 8 × users
    duration: float | None = None  # seconds per step, instead of a request count

    def step_iterations(self, users: int) -> int | None:
        if self.duration is not None:
            return None
        return self.iterations if self.iterations is not None else 8 * users

    def step_dir(self, users: int) -> Path:
        return self.output / f"users-{users:03d}"


def _step_env(plan: SweepPlan, users: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    opts = plan.options.model_copy(update={"iterations": plan.step_iterations(users)})
    env.update(opts.to_env())
    if not opts.api_key:
        env.pop("API_KEY", None)
    return env


def run_step_process(
    plan: SweepPlan, users: int, on_progress: Callable[[int, int, float], None] = lambda *_: None
) -> Path:
    """Run one step; `on_progress(done, failures, elapsed_s)` follows it. Returns the step's folder."""
    out = plan.step_dir(users)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "diffuserve.bench.step", "--users", str(users), "--out", str(out)]
    if plan.duration is not None:
        cmd += ["--duration", str(plan.duration)]
    log_path = out / "locust.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=_step_env(plan, users), stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                on_progress(int(event["done"]), int(event["failures"]), float(event["elapsed"]))
            code = proc.wait()
        except BaseException:
            # Ctrl-C or SIGTERM of the command: the step must not go on loading the server on its own.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if code != 0 or not (out / SAMPLES_FILE).exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise StepError(f"locust step with {users} users failed (exit {code}); see {log_path}:\n{tail}")
    return out


def run_sweep(plan: SweepPlan, progress: bool = True) -> list[StepSummary]:
    opts = plan.options
    counted = plan.duration is None
    per_step = [
        float(plan.step_iterations(u) or 0) if counted else (plan.duration or 0.0) for u in plan.users
    ]
    unit = "req" if counted else "s"
    summaries: list[StepSummary] = []
    with tqdm(total=sum(per_step), unit=unit, disable=not progress, dynamic_ncols=True) as bar:
        base: float = 0
        for users, step_total in zip(plan.users, per_step, strict=True):
            bar.set_description(f"{users} user{'s' if users > 1 else ''}")

            def update(done: int, failures: int, elapsed: float, base: float = base) -> None:
                if counted:
                    bar.n = base + done
                else:
                    bar.n = base + min(elapsed, plan.duration or 0.0)
                bar.set_postfix(requests=done, failures=failures, refresh=False)
                bar.refresh()

            before = fetch_metrics(opts.url, opts.api_key)
            out = run_step_process(plan, users, update)
            after = fetch_metrics(opts.url, opts.api_key)
            samples = read_samples(out / SAMPLES_FILE)
            summaries.append(summarize_step(users, samples, delta_from_text(before, after, opts.model)))
            base += step_total
            bar.n = base
            bar.refresh()
    return summaries


def steps_table(steps: Sequence[StepSummary]) -> str:
    """A plain-text table for the terminal once the sweep is done."""
    head = f"{'users':>5} {'requests':>8} {'fail':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>8} {'ovh ms':>7}"
    lines = [head]
    for s in steps:
        lat = s.latency_ms
        ovh = f"{s.overhead_ms.p50:7.1f}" if s.overhead_ms else f"{'–':>7}"
        if lat is None:
            lines.append(
                f"{s.users:>5} {s.requests:>8} {s.failures:>5} {'–':>9} {'–':>9} {'–':>9} {0.0:>8.2f} {ovh}"
            )
            continue
        lines.append(
            f"{s.users:>5} {s.requests:>8} {s.failures:>5} {lat.p50:>9.1f} {lat.p90:>9.1f} {lat.p99:>9.1f} "
            f"{s.images_per_s:>8.2f} {ovh}"
        )
    return "\n".join(lines)
