"""`diffuserve bench`: a locust latency sweep over concurrent users, with CSV/HTML/JSON/Markdown reports and plots."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffuserve.bench.options import LoadOptions
    from diffuserve.bench.summary import StepSummary
    from diffuserve.bench.sweep import SweepPlan

# Heavier modules (httpx, numpy, matplotlib, tqdm) are imported inside `run`: `diffuserve --help` and the
# other commands load this module too. locust itself never loads in this process (see bench/step.py).

DEFAULT_USERS = "1,2,4,8,16"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="latency benchmark over concurrent users (locust), with report and plots",
        description=(
            "Sweep concurrent users against the Images API with locust and write per-step CSV and HTML reports, "
            "summary.json, summary.md and PNG plots. Payload options fall back to the BENCH_* env vars that "
            "the locust file (src/diffuserve/bench/locustfile.py) reads."
        ),
    )
    target = parser.add_argument_group("target")
    target.add_argument("url", nargs="?", help="server base URL, e.g. http://127.0.0.1:8000 [env BENCH_URL]")
    target.add_argument(
        "--spawn-server",
        action="store_true",
        help="start `diffuserve serve` on a free local port for the run (its settings from the environment)",
    )
    target.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the spawned server, e.g. MODEL_BATCH=4 (repeatable)",
    )
    target.add_argument("--api-key", help="bearer token [env API_KEY]")
    target.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds to wait for /health/ready (default 300)"
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--users", default=DEFAULT_USERS, help=f"user counts to sweep (default {DEFAULT_USERS})"
    )
    amount = load.add_mutually_exclusive_group()
    amount.add_argument(
        "--iterations", type=int, help="requests per step, across its users (default 8 × users)"
    )
    amount.add_argument("--duration", type=float, help="seconds per step instead of a request count")
    load.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="requests sent one by one before the sweep and left out of it (default 1)",
    )
    load.add_argument(
        "--timeout", type=float, help="seconds one request may take (default 600) [env BENCH_TIMEOUT]"
    )
    load.add_argument(
        "--output", type=Path, default=Path("bench-out"), help="report folder (default bench-out)"
    )
    load.add_argument("--no-progress", action="store_true", help="no progress bar")

    payload = parser.add_argument_group("payload")
    payload.add_argument(
        "--model", help="model id, sent as `model` and X-Model-Name (default: the server's first)"
    )
    prompts = payload.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="prompt of every request [env BENCH_PROMPT]")
    prompts.add_argument(
        "--prompt-file", help="file with one prompt per line, picked at random [env BENCH_PROMPT_FILE]"
    )
    shape = payload.add_mutually_exclusive_group()
    shape.add_argument("--size", help="WIDTHxHEIGHT, e.g. 1024x1024 [env BENCH_SIZE]")
    shape.add_argument("--aspect-ratio", help="W:H, e.g. 16:9 [env BENCH_ASPECT_RATIO]")
    payload.add_argument("--steps", type=int, help="num_inference_steps [env BENCH_STEPS]")
    payload.add_argument("--guidance", type=float, help="guidance_scale [env BENCH_GUIDANCE]")
    payload.add_argument("--seed", type=int, help="one seed for every request (default: random per request)")
    payload.add_argument("--n", type=int, help="images per request (default 1) [env BENCH_N]")
    payload.add_argument(
        "--response-format",
        choices=["bytes", "b64_json"],
        help="bytes: image as the body (default); b64_json: OpenAI JSON [env BENCH_RESPONSE_FORMAT]",
    )
    parser.set_defaults(func=run, needs_extra="bench")


class UsageError(ValueError):
    """Flags that cannot work together; exit code 2 like argparse's own errors."""


def _server_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--server-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


# Values of these variables never reach the reports (summary.json, summary.md): tokens, keys, passwords.
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
MASK = "***"


def _mask_pair(pair: str) -> str:
    """`HF_TOKEN=hf_abc` → `HF_TOKEN=***`; a variable whose name says nothing secret keeps its value."""
    key, sep, _ = pair.partition("=")
    return f"{key}{sep}{MASK}" if sep and _SECRET_NAME.search(key) else pair


def recorded_server_env(pairs: list[str]) -> dict[str, str]:
    """The spawned server's extra environment as the reports show it, secret values masked."""
    return {key: MASK if _SECRET_NAME.search(key) else value for key, value in _server_env(pairs).items()}


def _load_options(args: argparse.Namespace) -> LoadOptions:
    """Flags over BENCH_* env vars over defaults; iterations are set per step by the sweep."""
    from diffuserve.bench.options import LoadOptions

    # A prompt flag replaces a prompt file from the env and the other way round; so do size and aspect ratio.
    exclusive: dict[str, Any] = {
        "prompt_file": "" if args.prompt is not None else None,
        "aspect_ratio": "" if args.size is not None else None,
        "size": "" if args.aspect_ratio is not None else None,
    }
    opts = LoadOptions.from_args(args, **{k: v for k, v in exclusive.items() if v is not None})
    return opts.model_copy(update={"iterations": None})


def _names_option(word: str, option: str) -> bool:
    """`word` is `option` or an abbreviation argparse accepts for it (an ambiguous one never gets this far)."""
    return len(word) > 2 and option.startswith(word)


def command_line(argv: list[str]) -> str:
    """The command as a reader would retype it, with the API key and secret `--server-env` values masked."""
    words = ["diffuserve", *argv[argv.index("bench") :]] if "bench" in argv else list(argv)
    out: list[str] = []
    for i, word in enumerate(words):
        previous = words[i - 1] if i > 0 else ""
        flag, sep, value = word.partition("=")
        if _names_option(previous, "--api-key"):
            word = MASK
        elif _names_option(previous, "--server-env"):
            word = _mask_pair(word)
        elif sep and _names_option(flag, "--api-key"):
            word = f"{flag}={MASK}"
        elif sep and _names_option(flag, "--server-env"):
            word = f"{flag}={_mask_pair(value)}"
        out.append(word)
    return shlex.join(out)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("diffuserve", "locust", "torch", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    # The commit the (spawned) server ran from, when this is a checkout; "-dirty" marks local changes.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if described.returncode == 0 and described.stdout.strip():
            out["git"] = described.stdout.strip()
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    machine = f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs"
    with contextlib.suppress(OSError, AttributeError):
        # Client and a spawned server share this machine: its load says how much the numbers can be trusted.
        machine += ", load average {:.2f} {:.2f} {:.2f} at the end".format(*os.getloadavg())
    return machine


@contextlib.contextmanager
def _target(args: argparse.Namespace, opts: LoadOptions, server_env: dict[str, str]) -> Iterator[str]:
    """The base URL to benchmark: the given one once ready, or a spawned server's for the block's length."""
    from diffuserve.bench.server import SpawnedServer, wait_ready

    if args.spawn_server:
        env = dict(server_env)
        if opts.api_key:
            env.setdefault("API_KEYS", opts.api_key)
        print("starting `diffuserve serve` for the run …", file=sys.stderr)
        with SpawnedServer(args.output / "server.log", env=env, ready_timeout=args.ready_timeout) as server:
            print(f"server ready at {server.base_url} (log: {server.log_path})", file=sys.stderr)
            yield server.base_url
    else:
        wait_ready(opts.url, args.ready_timeout, opts.api_key)
        yield opts.url


class Terminated(SystemExit):
    """SIGTERM, raised where the main thread is so `with` blocks (the spawned server's) clean up."""


def _on_sigterm(signum: int, _frame: object) -> None:
    # One stop is enough: a second SIGTERM must not cut short the clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(128 + signum)


def run(args: argparse.Namespace) -> int:
    from diffuserve.bench.options import OptionError

    # The spawned server runs in its own session, so a SIGTERM to this process alone would orphan it;
    # turned into an exception it unwinds `SpawnedServer.__exit__` (and the locust step) like Ctrl-C does.
    try:
        previous: Any = signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    except ValueError:  # not the main thread (embedded use): leave signals alone
        installed = False
    try:
        return _run(args)
    except (OptionError, UsageError) as exc:
        print(f"diffuserve bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffuserve bench: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print("diffuserve bench: terminated", file=sys.stderr)
        return int(exc.code or 143)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _run(args: argparse.Namespace) -> int:
    from diffuserve.bench.options import GENERATIONS_PATH, normalize_base_url, parse_users
    from diffuserve.bench.server import ServerError, list_models, warm_up
    from diffuserve.bench.sweep import StepError, SweepPlan, run_sweep, steps_table

    users = parse_users(args.users)
    if args.iterations is not None and args.iterations < max(users):
        raise UsageError(
            f"--iterations {args.iterations} leaves users idle at {max(users)} users; use >= {max(users)}"
        )
    if args.iterations is not None and args.iterations < 1:
        raise UsageError("--iterations must be >= 1")
    if args.duration is not None and args.duration <= 0:
        raise UsageError("--duration must be > 0")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if args.ready_timeout <= 0:
        raise UsageError("--ready-timeout must be > 0")
    server_env = _server_env(args.server_env)
    if args.server_env and not args.spawn_server:
        raise UsageError("--server-env only applies with --spawn-server")
    opts = _load_options(args)
    if args.spawn_server and args.url:
        raise UsageError("give a URL or --spawn-server, not both")
    if not args.spawn_server and not opts.url:
        raise UsageError("give the server URL (or BENCH_URL), or --spawn-server")
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output} is a file")
    args.output.mkdir(parents=True, exist_ok=True)

    try:
        with _target(args, opts, server_env) as base_url:
            opts = opts.model_copy(update={"url": normalize_base_url(base_url)})
            if not opts.model:
                models = list_models(opts.url, opts.api_key)
                if not models:
                    raise ServerError("the server lists no model at /v1/models; pass --model")
                opts = opts.model_copy(update={"model": models[0]})
                if len(models) > 1:
                    print(
                        f"benchmarking {models[0]} (of {', '.join(models)}); --model picks another",
                        file=sys.stderr,
                    )
            if args.warmup:
                # The first requests after start-up pay one-off costs (allocator, caches) a sweep should not show.
                rng = random.Random(0)
                for _ in range(args.warmup):
                    warm_up(opts.url, GENERATIONS_PATH, opts.payload(rng), opts.headers(), opts.timeout)
            plan = SweepPlan(
                users=users,
                options=opts,
                output=args.output,
                iterations=args.iterations,
                duration=args.duration,
            )
            started = dt.datetime.now(dt.timezone.utc)
            steps = run_sweep(plan, progress=not args.no_progress)
    except (ServerError, StepError) as exc:
        print(f"diffuserve bench: {exc}", file=sys.stderr)
        return 1

    _write_reports(args, plan, steps, started)
    print(steps_table(steps))
    print(f"\nreports in {args.output}/: summary.md, summary.json, latency.png, throughput.png, users-*/")
    if all(s.failures == s.requests for s in steps):
        print("diffuserve bench: every request failed; see summary.md", file=sys.stderr)
        return 1
    return 0


def report_meta(
    args: argparse.Namespace, plan: SweepPlan, started: dt.datetime, argv: list[str] | None = None
) -> dict[str, Any]:
    """What summary.json and summary.md say about the run; secrets (API key, secret env values) masked."""
    opts = plan.options
    if plan.duration is not None:
        load = f"{plan.duration:g} s per step"
    elif plan.iterations is not None:
        load = f"{plan.iterations} requests per step"
    else:
        load = "8 × users requests per step"
    meta = {
        "created": started.isoformat(timespec="seconds"),
        "url": "spawned: " + opts.url if args.spawn_server else opts.url,
        "model": opts.model,
        "command": command_line(sys.argv if argv is None else argv),
        "load": load,
        "warmup_requests": args.warmup,
        "users": plan.users,
        "options": opts.describe(),
        "versions": _versions(),
        "machine": _machine(),
    }
    if args.spawn_server and args.server_env:
        meta["server_env"] = recorded_server_env(args.server_env)
    return meta


def _write_reports(
    args: argparse.Namespace, plan: SweepPlan, steps: list[StepSummary], started: dt.datetime
) -> None:
    from diffuserve.bench.plots import LATENCY_PNG, THROUGHPUT_PNG, plot_latency, plot_throughput
    from diffuserve.bench.summary import markdown_report, write_summary_json

    meta = report_meta(args, plan, started)
    write_summary_json(args.output / "summary.json", meta, steps)
    (args.output / "summary.md").write_text(markdown_report(meta, steps), encoding="utf-8")
    title = f"{plan.options.model} · {meta['load']}"
    plot_latency(steps, args.output / LATENCY_PNG, title)
    plot_throughput(steps, args.output / THROUGHPUT_PNG, title)
