"""Attention kernels at the served models' shapes, one GPU: what tier L's attention could run on instead of cuDNN's
bf16 kernel, each candidate's time and its error against float32 attention on the same inputs.

    python benchmarks/gpu_attention.py --out $OUT          # writes attention.json (~1 minute on an H100)

Candidates: torch's scaled_dot_product_attention in bf16 on each backend it has (cuDNN, flash, memory-efficient),
and SageAttention's Triton kernels (INT8 QKᵀ with per-block scales, P·V in fp16; PyPI `sageattention`, where it
imports). Inputs: random normal q, k, v in bf16, the FLUX.1 1024² shape (24 heads of 128, 4096 image and 512
text tokens) at batch 1 and 4, and Qwen-Image's (24 heads of 128, 4096 + 256 tokens at batch 2: true CFG).
Each: median of `--iters` calls between CUDA events after `--warmup` calls; TFLOP/s counts 4·B·H·L²·D.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from common import environment, log, median_cuda_ms, out_dir, write_json

SHAPES = {  # name: (batch, heads, tokens, head dim)
    "flux-1024-b1": (1, 24, 4096 + 512, 128),
    "flux-1024-b4": (4, 24, 4096 + 512, 128),
    "qwen-image-1024-cfg": (2, 24, 4096 + 256, 128),
}
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_on(backend: Any) -> Attention:
    from torch.nn.attention import sdpa_kernel

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def candidates() -> tuple[dict[str, Attention], dict[str, str]]:
    """The kernels this machine has, and why any other was left out."""
    from torch.nn.attention import SDPBackend

    found: dict[str, Attention] = {
        "sdpa cuDNN bf16": sdpa_on(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash bf16": sdpa_on(SDPBackend.FLASH_ATTENTION),
        "sdpa memory-efficient bf16": sdpa_on(SDPBackend.EFFICIENT_ATTENTION),
    }
    missing: dict[str, str] = {}
    try:
        from sageattention import sageattn

        found["SageAttention 1 (Triton, INT8 QK, fp16 PV)"] = lambda q, k, v: sageattn(
            q, k, v, tensor_layout="HND"
        )
    except Exception as exc:  # not installed, or its Triton kernels do not build here
        missing["SageAttention"] = f"{type(exc).__name__}: {exc}"
    return found, missing


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.float() - reference).norm() / reference.norm())


def measure(
    shape: tuple[int, int, int, int], found: dict[str, Attention], args: argparse.Namespace
) -> list[dict[str, Any]]:
    batch, heads, tokens, dim = shape
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    # The reference: the same bf16 inputs, attention in float32 (the math backend: no kernel's shortcuts).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * batch * heads * tokens * tokens * dim
    rows = []
    for name, run in found.items():
        row: dict[str, Any] = {"kernel": name}
        try:
            row["ms"] = round(median_cuda_ms(partial(run, q, k, v), args.warmup, args.iters), 4)
            row["tflops"] = round(flops / row["ms"] / 1e9, 1)
            row["rel_err_vs_fp32"] = relative_error(run(q, k, v), reference)
        except Exception as exc:  # a backend that does not take this shape or card
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        log(f"{shape} {name}: {row}")
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_attention.py needs a CUDA GPU")
    out = out_dir(args.out)
    found, missing = candidates()
    versions = {name: _version(name) for name in ("triton", "sageattention")}
    report: dict[str, Any] = {
        "environment": environment(),
        "versions": versions,
        "missing": missing,
        "shapes": {},
    }
    for name in args.shapes.split(","):
        report["shapes"][name] = {"shape": SHAPES[name], "rows": measure(SHAPES[name], found, args)}
        write_json(out / "attention.json", report)


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    main()
