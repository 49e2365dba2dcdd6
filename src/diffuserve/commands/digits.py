"""The digits model's commands: `train-digits`, `train-digits-lora`, `eval digits`, `digits-grid`, `digits-showcase`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train-digits",
        help="train the built-in digits model (fixed seed, CPU) and save it into the package",
        description="Train the classifier, the VAE and the flow-matching transformer on scikit-learn's digits.",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    train.add_argument("--vae-steps", type=int, default=None)
    train.add_argument("--flow-steps", type=int, default=None)
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="pipeline folder, replaced by the new model: new, empty or an earlier output "
        "(default: the package's digits/pipeline)",
    )
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.set_defaults(func=_train, needs_extra="digits")

    lora = subparsers.add_parser(
        "train-digits-lora",
        help='train the digits model\'s "mirror" LoRA (fixed seed, CPU) and save it into the package',
        description="Train a LoRA on the frozen digits model that draws every digit mirrored left-right, "
        "then measure it with the digit classifier, with and without the adapter.",
    )
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    lora.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    lora.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha equal to it (default 4)")
    lora.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for mirror.safetensors and mirror.json (default: the package's digits/loras)",
    )
    lora.add_argument("--eval-seeds", type=int, default=20, help="seeds × 10 digits to evaluate on (0: none)")
    lora.set_defaults(func=_train_lora, needs_extra="digits")

    evaluate = subparsers.add_parser(
        "eval",
        help="measure a built-in model's quality (digits: prompt-following accuracy)",
        description="Generate every digit over many seeds and report how often the classifier agrees.",
    )
    evaluate.add_argument("model", choices=["digits"])
    evaluate.add_argument(
        "--per-digit", type=int, default=None, help="images per digit (seeds 0..N-1; default 20)"
    )
    evaluate.add_argument("--seeds", default=None, help="explicit seeds, e.g. 0-19 or 3,7,11")
    evaluate.add_argument(
        "--steps", type=int, default=None, help="inference steps (default: the serving default)"
    )
    evaluate.add_argument(
        "--path", type=Path, default=None, help="pipeline folder (default: the built-in one)"
    )
    evaluate.add_argument("--json", type=Path, default=None, help="also write the full result as JSON here")
    # One thread by default: on a shared 2-core machine it is several times faster than two (docs/benchmarks.md).
    evaluate.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    evaluate.set_defaults(func=_eval, needs_extra="digits")

    grid = subparsers.add_parser(
        "digits-grid",
        help="write a PNG grid of the ten digits, through a running server's Images API or the pipeline",
    )
    grid.add_argument("--base-url", default=None, help="server to call, e.g. http://127.0.0.1:8000")
    grid.add_argument("--local", action="store_true", help="no server: run the built-in pipeline directly")
    grid.add_argument("--api-key", default="none")
    grid.add_argument("--seeds", default="0-3", help="one row per seed")
    grid.add_argument("--out", type=Path, default=Path("docs/digits.png"))
    grid.set_defaults(func=_grid)

    showcase = subparsers.add_parser(
        "digits-showcase",
        help="write the docs' edit and streaming-preview figures through a running server's Images API",
    )
    showcase.add_argument("--base-url", required=True, help="server to call, e.g. http://127.0.0.1:8000")
    showcase.add_argument("--api-key", default="none")
    showcase.add_argument("--edits-out", type=Path, default=Path("docs/edits.png"))
    showcase.add_argument("--previews-out", type=Path, default=Path("docs/previews.png"))
    showcase.set_defaults(func=_showcase, needs_extra="digits")


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from diffuserve.models.digits.train import (
        PIPELINE_DIR,
        OutDirError,
        TrainConfig,
        check_out_dir,
        train_and_evaluate,
    )

    out = PIPELINE_DIR if args.out is None else args.out
    try:
        check_out_dir(out)
    except OutDirError as exc:
        print(f"diffuserve train-digits: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {"threads": args.threads, "vae_steps": args.vae_steps, "flow_steps": args.flow_steps}
    cfg = replace(TrainConfig(seed=args.seed), **{k: v for k, v in overrides.items() if v is not None})
    record, result = train_and_evaluate(cfg, out, eval_seeds=0 if args.no_eval else 20)
    print(f"trained in {record['train_seconds']:.0f} s ({cfg.threads} thread(s))")
    if result is not None:
        print(result.report())
    return 0


def _train_lora(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from diffuserve.models.digits.lora_evaluate import report
    from diffuserve.models.digits.lora_train import LORA_DIR, LoraTrainConfig, train_mirror

    out = LORA_DIR if args.out is None else args.out
    if out.exists() and not out.is_dir():
        print(f"diffuserve train-digits-lora: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = {"threads": args.threads, "steps": args.steps, "rank": args.rank, "lora_alpha": args.rank}
    cfg = replace(LoraTrainConfig(seed=args.seed), **{k: v for k, v in overrides.items() if v is not None})
    record = train_mirror(cfg, out, eval_seeds=max(0, args.eval_seeds))
    print(
        f"trained in {record['train_seconds']:.0f} s ({cfg.threads} thread(s)), {record['weights_bytes']} bytes"
    )
    if "evaluation" in record:
        print(report(record["evaluation"]))
    return 0


def _run_eval(path: Path | None, seeds: list[int], steps: int | None) -> Any:
    from diffusers import FluxPipeline

    from diffuserve.models.digits.classifier import load_classifier
    from diffuserve.models.digits.evaluate import evaluate
    from diffuserve.models.registry import BUILTIN_MODELS

    pipe = FluxPipeline.from_pretrained(str(path)) if path else BUILTIN_MODELS["digits"]()
    return evaluate(pipe, load_classifier(), seeds=seeds, steps=steps)


def _eval(args: argparse.Namespace) -> int:
    from diffuserve.models.digits.evaluate import parse_seeds

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.seeds:
        seeds = parse_seeds(args.seeds)
        if args.per_digit is not None and args.per_digit != len(seeds):
            print(f"--per-digit {args.per_digit} disagrees with {len(seeds)} --seeds", file=sys.stderr)
            return 2
    else:
        seeds = list(range(args.per_digit if args.per_digit is not None else 20))
    result = _run_eval(args.path, seeds, args.steps)
    print(result.report())
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _grid(args: argparse.Namespace) -> int:
    from diffuserve.commands.digits_figures import write_grid
    from diffuserve.extras import require_extra
    from diffuserve.models.digits.evaluate import parse_seeds

    if not args.base_url and not args.local:
        print("give --base-url of a running server, or --local to use the pipeline directly", file=sys.stderr)
        return 2
    if not args.local:
        require_extra("digits", "digits-grid --base-url")  # the official openai client
    out = write_grid(args.out, parse_seeds(args.seeds), None if args.local else args.base_url, args.api_key)
    print(f"wrote {out}")
    return 0


def _showcase(args: argparse.Namespace) -> int:
    from diffuserve.commands.digits_figures import compose_grid, edit_rows, preview_rows

    for out, rows in (
        (args.edits_out, edit_rows(args.base_url, seeds=range(3), api_key=args.api_key)),
        (args.previews_out, preview_rows(args.base_url, digits=(2, 5, 7), api_key=args.api_key)),
    ):
        out.parent.mkdir(parents=True, exist_ok=True)
        compose_grid(rows).save(out)
        print(f"wrote {out}")
    return 0
