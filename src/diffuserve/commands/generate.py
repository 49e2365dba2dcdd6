"""`diffuserve generate PROMPT -o FILE`: one image to a file, in this process, no server."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from diffuserve.config import DEFAULT_MODEL, Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="generate one image to a file without a server")
    parser.add_argument("prompt")
    parser.add_argument(
        "-o", "--output", default="out.webp", help="file to write; its suffix picks the format"
    )
    parser.add_argument("--model-repo", default=None, help=f"model (default: MODEL_REPO or {DEFAULT_MODEL})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--aspect-ratio", default=None)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the model's)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--tier", default=None, help="E, XL, L, M or S")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--weights", default=None, help="pretrained or random")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffuserve.engine.engine import Engine
    from diffuserve.engine.loader import ModelLoadError
    from diffuserve.errors import InvalidRequest
    from diffuserve.messages import BatchResult
    from diffuserve.protocol import ImageGenerationRequest
    from diffuserve.serving.engine_config import engine_config
    from diffuserve.serving.image_encoder import BatchEncoder
    from diffuserve.serving.worker_handle import resolve_devices
    from diffuserve.types import BatchJob

    output = Path(args.output)
    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(output.suffix.lower())
    if fmt is None:
        print(
            f"diffuserve generate: {output.suffix or 'no suffix'} is not .png, .jpg or .webp", file=sys.stderr
        )
        return 2
    try:
        settings = Settings.from_env(
            models=[args.model_repo] if args.model_repo else None,
            model_size=args.tier,
            weights=args.weights,
            model_batch=1,
        )
        settings.export_hub_env()
        engine = Engine(engine_config(settings), resolve_devices(args.device)[0])
        model = engine.load()
        body = ImageGenerationRequest.parse(
            {
                k: v
                for k, v in {
                    "prompt": args.prompt,
                    "seed": args.seed,
                    "width": args.width,
                    "height": args.height,
                    "aspect_ratio": args.aspect_ratio,
                    "num_inference_steps": args.steps,
                    "guidance_scale": args.guidance,
                    "negative_prompt": args.negative_prompt,
                    "output_format": fmt,
                }.items()
                if v is not None
            }
        )
        request = body.to_generation(request_id="cli", model=model, max_images=1)
    except (ValueError, ModelLoadError, InvalidRequest) as exc:
        print(f"diffuserve generate: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    job = BatchJob.of(0, [request])
    started = time.perf_counter()
    computed = engine.compute(job)
    result = computed if isinstance(computed, BatchResult) else BatchEncoder(threads=1).encode_batch(computed)
    if result.error:
        print(f"diffuserve generate: {result.error}", file=sys.stderr)
        return 1
    output.write_bytes(result.images[0][0].data)
    print(
        f"wrote {output} ({request.width}x{request.height}, {request.steps} steps, seed {request.seed}, "
        f"{(time.perf_counter() - started) * 1000:.0f} ms)"
    )
    return 0
