"""`diffuserve deploy modal | render`: validate a Modal deployment plan and run the modal CLI, or render the front."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from diffuserve.deploy import DEPLOY_DIR
from diffuserve.deploy.modal_plan import (
    COMPILE_DIR,
    GPU_MAX_COUNT,
    HF_HOME,
    MODES,
    SCALEDOWN_MAX,
    SCALEDOWN_MIN,
    SNAPSHOT_DOCS,
    VOLUME_MOUNT,
    ModalPlan,
    PlanError,
)
from diffuserve.deploy.render import add_front_arguments, render_from_args

APP_FILE = DEPLOY_DIR / "modal_app.py"
PLAN_LINE = "PLAN = ModalPlan.from_env(os.environ)\n"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="deploy behind nginx: on Modal, or render the nginx/supervisord configs",
        description="Production deployment: the model server behind an nginx front under supervisord.",
    )
    targets = parser.add_subparsers(dest="target", metavar="TARGET")
    _register_modal(targets)
    _register_render(targets)
    parser.set_defaults(func=lambda args: _missing_target(parser))


def _missing_target(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _register_modal(targets: Any) -> None:
    p = targets.add_parser(
        "modal",
        help="deploy on Modal: one GPU, a fixed fleet or an autoscaled one",
        description=(
            "Validate the plan, then run `modal deploy` (or `modal serve`) on diffuserve's Modal app. "
            "Needs the modal package and a token (`modal setup`). See docs/deploy-modal.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scale = p.add_argument_group("scaling")
    scale.add_argument(
        "--mode", choices=MODES, default="single", help="single GPU, fixed fleet, or autoscale"
    )
    scale.add_argument("--containers", type=int, help="fleet size for --mode fixed (min = max = N)")
    scale.add_argument(
        "--min", dest="min_containers", type=int, help="autoscale: containers kept warm (default 0)"
    )
    scale.add_argument("--max", dest="max_containers", type=int, help="autoscale: most containers (required)")
    scale.add_argument(
        "--scaledown-window",
        type=int,
        help=f"autoscale: idle seconds before a container stops ({SCALEDOWN_MIN}..{SCALEDOWN_MAX}; default 300)",
    )
    scale.add_argument("--max-inputs", type=int, help="concurrent requests per container (default 4 × batch)")
    scale.add_argument(
        "--target-inputs", type=int, help="concurrency the autoscaler targets (default: batch)"
    )

    hw = p.add_argument_group("container")
    hw.add_argument("--gpu", default="H100", help=f"Modal GPU[:count], one of {', '.join(GPU_MAX_COUNT)}")
    hw.add_argument("--timeout", type=int, default=3600, help="Modal function timeout, seconds")
    hw.add_argument(
        "--startup-timeout", type=int, default=1200, help="seconds a container may take to get ready"
    )
    hw.add_argument("--ephemeral-disk-gib", type=int, help="ephemeral disk per container (default: Modal's)")
    hw.add_argument("--port", type=int, default=8000, help="port nginx listens on inside the container")
    hw.add_argument(
        "--gpu-snapshot",
        action="store_true",
        help=(
            "Modal GPU memory snapshot (alpha): the first containers of a deploy snapshot the server once every "
            "batch size is warm, GPU memory included; later ones resume from it, skipping the imports, the "
            "pipeline's build and the compilation. One GPU per container; `modal deploy` only"
        ),
    )

    model = p.add_argument_group("model")
    model.add_argument(
        "--model-repo", default="black-forest-labs/FLUX.1-schnell", help="hub repo or built-in id"
    )
    model.add_argument("--model-name", help="name clients send as `model` / X-Model-Name")
    model.add_argument(
        "--model-batch", type=int, default=4, help="most images per batch (sizes concurrency too)"
    )
    model.add_argument("--model-size", help="acceleration tier E, XL, L, M or S (default: the server's)")
    model.add_argument(
        "--offline",
        action="store_true",
        help="serve from the Volume only (HF_HUB_OFFLINE=1); run --prefetch first",
    )

    names = p.add_argument_group("names and secrets")
    names.add_argument("--app-name", default="diffuserve", help="Modal app name")
    names.add_argument("--label", help="endpoint label: https://<workspace>--<label>.modal.run")
    names.add_argument(
        "--volume", default="diffuserve-hf-cache", help="Modal Volume holding the HF and compile caches"
    )
    names.add_argument("--hf-secret", help="Modal secret holding HF_TOKEN (gated repos such as FLUX.1-dev)")
    names.add_argument(
        "--api-key-secret", help="Modal secret holding API_KEYS (bearer keys clients must send)"
    )

    run = p.add_argument_group("what to run")
    run.add_argument(
        "--prefetch", action="store_true", help="first download the weights into the Volume (once)"
    )
    run.add_argument(
        "--serve", action="store_true", help="`modal serve` (temporary dev endpoint) instead of deploy"
    )
    run.add_argument("--environment", "-e", help="Modal environment (default: your profile's)")
    run.add_argument(
        "--app", type=Path, default=APP_FILE, help="Modal app file (e.g. an edited --write-app copy)"
    )
    run.add_argument(
        "--write-app", type=Path, metavar="PATH", help="write an editable modal_app.py with this plan"
    )
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan and commands only")
    p.set_defaults(func=run_modal)


def _register_render(targets: Any) -> None:
    p = targets.add_parser(
        "render",
        help="write nginx.conf and supervisord.conf for the front from the environment",
        description=(
            "Render the front's configs. Every flag also reads an environment variable (shown in brackets); "
            "MAX_BODY_BYTES, MAX_UPLOAD_BYTES, REQUEST_TIMEOUT and API_KEYS/AUTH_TOKEN are the server's settings, read "
            "here too."
        ),
    )
    add_front_arguments(p)
    p.set_defaults(func=render_from_args)


def plan_from_args(args: argparse.Namespace) -> ModalPlan:
    """Flags → plan; scaling flags are checked against the mode here, everything else in ModalPlan."""
    lo, hi, count = args.min_containers, args.max_containers, args.containers
    if args.mode == "single":
        if count is not None:
            raise PlanError("--containers only applies to --mode fixed")
        lo = 1 if lo is None else lo
        hi = 1 if hi is None else hi
    elif args.mode == "fixed":
        if count is None and lo is None and hi is None:
            raise PlanError("--mode fixed needs --containers N")
        if count is not None:
            if (lo is not None and lo != count) or (hi is not None and hi != count):
                raise PlanError(
                    f"--containers {count} contradicts --min/--max; fixed mode keeps min = max = N"
                )
            lo = hi = count
        else:
            lo = hi if lo is None else lo
            hi = lo if hi is None else hi
    else:
        if count is not None:
            raise PlanError("--containers only applies to --mode fixed; autoscale takes --min and --max")
        if hi is None:
            raise PlanError("--mode autoscale needs --max N (the most containers to run)")
        lo = 0 if lo is None else lo
    return ModalPlan(
        app_name=args.app_name,
        label=args.label,
        gpu=args.gpu,
        mode=args.mode,
        min_containers=lo,
        max_containers=hi,
        scaledown_window=args.scaledown_window,
        model_repo=args.model_repo,
        model_name=args.model_name,
        model_batch=args.model_batch,
        model_size=args.model_size,
        max_inputs=args.max_inputs,
        target_inputs=args.target_inputs,
        timeout=args.timeout,
        startup_timeout=args.startup_timeout,
        ephemeral_disk_gib=args.ephemeral_disk_gib,
        volume=args.volume,
        hf_secret=args.hf_secret,
        api_key_secret=args.api_key_secret,
        port=args.port,
        offline=args.offline,
        gpu_snapshot=args.gpu_snapshot,
    )


def describe(plan: ModalPlan, *, serve: bool = False) -> str:
    if plan.mode == "single":
        scaling = "1 container"
    elif plan.mode == "fixed":
        scaling = f"{plan.min_containers} containers, always on"
    else:
        scaling = (
            f"{plan.min_containers}..{plan.max_containers} containers, "
            f"scale down after {plan.effective_scaledown_window}s idle"
        )
    secrets = ", ".join(
        f"{k}={v}" for k, v in (("hf", plan.hf_secret), ("api keys", plan.api_key_secret)) if v
    )
    return "\n".join(
        [
            f"app {plan.app_name}: {plan.model_repo} (batch {plan.model_batch}) on {plan.gpu}",
            f"  scaling:     {scaling}",
            f"  concurrency: target {plan.concurrency_target}, max {plan.concurrency_max} requests per container",
            f"  timeouts:    function {plan.timeout}s, startup {plan.startup_timeout}s",
            f"  volume:      {plan.volume} at {VOLUME_MOUNT} (weights in {HF_HOME}, compile cache below)",
            *compile_lines(),
            *snapshot_lines(plan, serve=serve),
            f"  secrets:     {secrets or 'none'}",
        ]
    )


def compile_lines() -> list[str]:
    """Where compiled artefacts live: the Volume, which Modal commits in the background and mounts, at its latest
    commit, in every new container."""
    return [
        f"  compile:     {COMPILE_DIR} on the volume: torch's saved compile artefacts and the inductor and",
        "               Triton caches; Modal commits them in the background, so later containers load them",
        "               instead of compiling",
    ]


def snapshot_lines(plan: ModalPlan, *, serve: bool) -> list[str]:
    """Which memory snapshot the app takes, and why a CPU-only one does not apply to this server."""
    if not plan.gpu_snapshot:
        return [
            "  snapshot:    CPU memory: off, does not apply here: Modal takes a CPU-only snapshot without a GPU,",
            "               and the start-up worth skipping (torch imports, weights, compilation) is in the GPU",
            "               worker, a spawned process that needs the GPU",
            "               GPU memory: off (--gpu-snapshot turns it on; a Modal alpha)",
            f"               {SNAPSHOT_DOCS}",
        ]
    lines = [
        "  snapshot:    CPU + GPU memory: on (a Modal alpha): once every batch size is warm, the first containers",
        "               of a deploy snapshot the front, the server and its worker; later containers resume from",
        "               it, skipping the imports, the pipeline's build and the compilation (the weights come",
        "               back with the GPU memory)",
    ]
    if serve:
        lines.append("               (`modal serve` makes none: Modal snapshots deployed apps only)")
    return [*lines, f"               {SNAPSHOT_DOCS}"]


def modal_commands(
    plan: ModalPlan, app_file: Path, *, prefetch: bool, serve: bool, environment: str | None
) -> list[list[str]]:
    env_flag = ["--env", environment] if environment else []
    commands: list[list[str]] = []
    if prefetch:
        commands.append([sys.executable, "-m", "modal", "run", *env_flag, f"{app_file}::prefetch"])
    commands.append([sys.executable, "-m", "modal", "serve" if serve else "deploy", *env_flag, str(app_file)])
    return commands


def write_app(plan: ModalPlan, dest: Path) -> Path:
    """A copy of modal_app.py with this plan written out as a literal, to read and edit."""
    source = APP_FILE.read_text()
    if PLAN_LINE not in source:
        raise PlanError(f"{APP_FILE} no longer has the line {PLAN_LINE.strip()!r} to replace")
    plan = plan.model_copy(update={"scaledown_window": plan.effective_scaledown_window})
    body = "".join(f"    {name}={_literal(getattr(plan, name))},\n" for name in type(plan).model_fields)
    literal = (
        f"# Written by `diffuserve deploy modal --write-app`; edit freely.\nPLAN = ModalPlan(\n{body})\n"
    )
    if dest.is_dir():
        dest = dest / "modal_app.py"
    dest.write_text(source.replace(PLAN_LINE, literal))
    return dest


def _literal(value: object) -> str:
    # Double-quoted like the rest of the code base (json quoting is valid Python for these plain strings);
    # an enum (the tier) is written as its value, which the plan reads back.
    if isinstance(value, Enum):
        value = value.value
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _check_modal_ready() -> None:
    if importlib.util.find_spec("modal") is None:
        from diffuserve.extras import install_command

        raise PlanError(f"the modal package is not installed: {install_command('deploy')}")
    from modal.config import config

    if not (config.get("token_id") and config.get("token_secret")):
        raise PlanError(
            "no Modal token found: run `modal setup` (or `modal token set`), or set MODAL_TOKEN_ID and "
            "MODAL_TOKEN_SECRET"
        )


def run_modal(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
        app_file = args.app.expanduser().resolve()
        if not app_file.is_file():
            raise PlanError(f"--app {app_file} does not exist")
        if PLAN_LINE not in app_file.read_text():
            # A --write-app copy has its plan spelled out: flags passed here would be silently ignored.
            raise PlanError(
                f"--app {app_file} does not read its plan from the flags; run `modal deploy {app_file}`"
            )
        if args.write_app:
            written = write_app(plan, args.write_app)
            print(f"wrote {written}; deploy it with: modal deploy {shlex.quote(str(written))}")
            return 0
        print(describe(plan, serve=args.serve))
        commands = modal_commands(
            plan, app_file, prefetch=args.prefetch, serve=args.serve, environment=args.environment
        )
        env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.to_env().items())
        if args.dry_run:
            for command in commands:
                print(f"would run: {env_text} {shlex.join(command)}")
            return 0
        _check_modal_ready()
    except PlanError as exc:
        print(f"diffuserve deploy modal: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, **plan.to_env()}
    for command in commands:
        print(f"$ {shlex.join(command)}", flush=True)
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            print(
                f"diffuserve deploy modal: `{shlex.join(command[2:])}` failed ({result.returncode})",
                file=sys.stderr,
            )
            return result.returncode
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffuserve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
