"""The VAE decode at the served sizes, one GPU: eager as diffusers runs it against the ways it could run faster, each
variant's time and how far its image is from eager's.

    python benchmarks/gpu_vae.py --iters 8 --out $OUT     # writes vae.json (all ten variants: ~6 min on an H100)

The VAE is FLUX.1's (16 latent channels, the released config; SD3 and Z-Image have the same architecture), with
random weights in bf16, decoding random latents of a 1024² image at batch 1 and 4. Variants: eager (the
reference); eager with cuDNN's algorithm search (`cudnn.benchmark`); channels-last, eager; `torch.compile` of the
decode (static shapes, the default mode), also channels-last; and regional compiles with dynamic shapes, the rest
of the decode eager, their graphs shared between batch sizes above 1 (dynamo specialises a size of 1): the
GroupNorms alone, and each resnet block (GroupNorm, SiLU, the two convolutions), also channels-last; and the
GroupNorms through a Triton kernel that spreads each group's statistics over many programs
(`triton_group_norm.py`, no compile), the rest eager, also with the SiLU after a norm fused into it. Each: median
of `--iters` decodes between CUDA events after `--warmup` decodes; the first call's seconds (compile or algorithm
search included); how far its pixels (0-255) are from eager's (largest difference, share of pixels that differ,
PSNR); and whether its last call gives its first call's pixels. Each variant sets the memory format and
`cudnn.benchmark` it needs and undoes an earlier variant's compiles; the script leaves the last variant's
settings behind.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from common import environment, log, median_cuda_ms, out_dir, write_json
from diffuserve.engine.tiers.compile import RECOMPILE_LIMIT

SHAPES = {"1024-b1": (1, 1024), "1024-b4": (4, 1024)}  # name: (batch, image side)
Decode = Callable[[torch.Tensor], torch.Tensor]


def random_flux_vae() -> Any:
    from diffuserve.models.architectures import FLUX_VAE, build_vae

    torch.manual_seed(0)
    return build_vae(FLUX_VAE).to("cuda", torch.bfloat16)


def pixels(image: torch.Tensor) -> torch.Tensor:
    """The decode's output as the pipeline post-processes it: [-1, 1] to uint8."""
    return ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def variants(vae: Any) -> dict[str, Callable[[], Decode]]:
    """Each variant's set-up, run just before it is measured (they change the module or process settings; the
    set-up after it undoes what the one before changed)."""

    def reset(channels_last: bool, search: bool = False) -> None:
        """The decoder as loaded (an earlier variant's changes undone), in the memory format asked for."""
        torch.backends.cudnn.benchmark = search
        uncompile(vae)
        vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def plain(channels_last: bool = False, search: bool = False) -> Callable[[], Decode]:
        def setup() -> Decode:
            reset(channels_last, search)
            return lambda z: vae.decode(z, return_dict=False)[0]

        return setup

    def compiled(channels_last: bool = False) -> Callable[[], Decode]:
        def setup() -> Decode:
            reset(channels_last)
            run = torch.compile(lambda z: vae.decode(z, return_dict=False)[0], dynamic=False)
            return run  # type: ignore[no-any-return]

        return setup

    def regional(kind: str, channels_last: bool = False) -> Callable[[], Decode]:
        def setup() -> Decode:
            reset(channels_last)
            # One graph for each block shape and input layout the decoder has (more than dynamo's default 8):
            # the engine's own limit.
            dynamo_config: Any = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
            for module in vae.decoder.modules():
                if type(module).__name__ != kind:
                    continue
                if isinstance(module, torch.nn.GroupNorm):
                    # `nn.Module.compile` of a torch.nn module traced nothing (seen on CPU: its forward is torch's
                    # own code, where dynamo starts no frame): the norm goes through a compiled function instead.
                    module.forward = partial(compiled_group_norm, module)  # type: ignore[method-assign]
                else:
                    module.compile(dynamic=True)
            return lambda z: vae.decode(z, return_dict=False)[0]

        return setup

    def triton_norms(fuse_silu: bool = False) -> Callable[[], Decode]:
        def setup() -> Decode:
            decode = plain()()
            from triton_group_norm import group_norm_forward

            decoder = vae.decoder
            # The norms whose output goes straight into SiLU: each resnet block's two (a VAE's blocks have no
            # time embedding, the activation's only other use) and the one before the output convolution.
            followed = [
                (block, (block.norm1, block.norm2)) for block in decoder.modules() if hasattr(block, "norm2")
            ]
            followed.append((decoder, (decoder.conv_norm_out,)))
            fused = {id(norm) for _, norms in followed for norm in norms} if fuse_silu else set()
            for module in decoder.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    forward = partial(group_norm_forward, module, silu=id(module) in fused)
                    module.forward = forward  # type: ignore[method-assign]
            if fuse_silu:
                for owner, _ in followed:
                    swap(owner, "conv_act" if owner is decoder else "nonlinearity", torch.nn.Identity())
            return decode

        return setup

    return {
        "eager": plain(),
        "eager cudnn-benchmark": plain(search=True),
        "eager channels-last": plain(channels_last=True),
        "compiled": compiled(),
        "compiled channels-last": compiled(channels_last=True),
        "GroupNorms compiled": regional("GroupNorm"),
        "resnet blocks compiled": regional("ResnetBlock2D"),
        "resnet blocks compiled channels-last": regional("ResnetBlock2D", channels_last=True),
        "GroupNorms Triton kernel": triton_norms(),
        "GroupNorms + SiLU Triton kernel": triton_norms(fuse_silu=True),
    }


@torch.compile(dynamic=True)
def compiled_group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


# (module, attribute, its own value) of every submodule a variant replaced, restored by `uncompile`.
SWAPPED: list[tuple[torch.nn.Module, str, Any]] = []


def swap(module: torch.nn.Module, name: str, replacement: Any) -> None:
    SWAPPED.append((module, name, getattr(module, name)))
    setattr(module, name, replacement)


def uncompile(vae: Any) -> None:
    """Undo the regional compiles of an earlier variant (`nn.Module.compile` keeps the compiled call in
    `_compiled_call_impl`, and torch has no public way back; the norms' own `forward` set on the instance; the
    submodules it swapped) and forget dynamo's graphs."""
    while SWAPPED:
        module, name, original = SWAPPED.pop()
        setattr(module, name, original)
    for module in vae.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
        module.__dict__.pop("forward", None)
    torch._dynamo.reset()


def difference(got: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    delta = (got.int() - reference.int()).abs()
    mse = float((delta.float() ** 2).mean())
    return {
        "max_abs": int(delta.max()),
        "share_differing": round(float((delta > 0).float().mean()), 4),
        "psnr_db": None if mse == 0 else round(10 * math.log10(255**2 / mse), 2),
    }


def measure(
    vae: Any, name: str, setup: Callable[[], Decode], args: argparse.Namespace, eager: dict[str, torch.Tensor]
) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "shapes": {}}
    try:
        decode = setup()
        for shape, (batch, side) in SHAPES.items():
            generator = torch.Generator("cuda").manual_seed(0)
            channels = vae.config.latent_channels
            latents = torch.randn(batch, channels, side // 8, side // 8, device="cuda", generator=generator)
            latents = latents.to(torch.bfloat16)
            started = time.perf_counter()
            with torch.inference_mode():
                first = pixels(decode(latents))
                torch.cuda.synchronize()
                first_s = time.perf_counter() - started
                ms = median_cuda_ms(partial(decode, latents), args.warmup, args.iters)
                again = pixels(decode(latents))
            result: dict[str, Any] = {
                "ms": round(ms, 2),
                "ms_per_image": round(ms / batch, 2),
                "first_call_s": round(first_s, 2),
                "repeatable": bool(torch.equal(first, again)),
            }
            if name == "eager":
                eager[shape] = first
            elif shape in eager:
                result["vs_eager"] = difference(first, eager[shape])
            row["shapes"][shape] = result
            log(f"{name} {shape}: {result}")
    except Exception as exc:  # one variant failing (a compile error, out of memory) must not lose the others
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        log(f"{name}: {row['error']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_vae.py needs a CUDA GPU")
    out = out_dir(args.out)
    vae = random_flux_vae()
    found = variants(vae)
    names = args.variants.split(",") if args.variants else list(found)
    unknown = [name for name in names if name not in found]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(found)}")
    report: dict[str, Any] = {"environment": environment(), "shapes": SHAPES, "rows": []}
    eager: dict[str, torch.Tensor] = {}
    for name in ["eager", *(n for n in names if n != "eager")]:
        report["rows"].append(measure(vae, name, found[name], args, eager))
        write_json(out / "vae.json", report)


if __name__ == "__main__":
    main()
