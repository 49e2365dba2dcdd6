"""Context parallelism's pieces: which sizes a worker group serves, models it refuses, and step-cache
decisions that every rank takes alike from its own share of the tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from diffuserve.engine.config import ParallelAttention
from diffuserve.engine.loader import LoadedPipeline
from diffuserve.engine.parallel import context
from diffuserve.engine.parallel.context import ParallelUnsupported, parallelize, ring_p2p_runs, token_pixels
from diffuserve.engine.tiers.cache import _relative_l1
from diffuserve.errors import InvalidRequest
from diffuserve.models.tiny_flux import build_tiny_flux
from diffuserve.protocol import ASPECT_RATIOS, ImageGenerationRequest, dimensions_for_aspect
from diffuserve.types import TINY_FLUX
from tests.helpers import spawn_ranks
from tests.unit.test_protocol import FLUX

GROUP_OF_2 = replace(FLUX, parallel=2, token_pixels=16)


def convert(model=GROUP_OF_2, **body: object):
    return ImageGenerationRequest.parse({"prompt": "p", **body}).to_generation(
        request_id="r", model=model, max_images=10
    )


@pytest.mark.parametrize(
    ("body", "param"), [({"size": "1040x1040"}, "size"), ({"width": 1040, "height": 1040}, "width")]
)
def test_a_size_whose_tokens_do_not_split_is_a_400_naming_it(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        convert(**body)
    message = str(caught.value)
    assert caught.value.param == param
    assert "1040x1040" in message and "4225 image tokens" in message and "2 devices" in message
    assert "multiple of 32" in message
    # One worker takes it; so does a group when one side has an even token count.
    assert convert(FLUX, size="1040x1040").width == 1040
    assert (convert(size="1040x1024").width, convert(size="1040x1024").height) == (1040, 1024)


@pytest.mark.parametrize("parallel", [2, 4, 8])
@pytest.mark.parametrize("ratio", list(ASPECT_RATIOS))
def test_every_aspect_ratio_gives_a_size_the_group_serves(ratio: str, parallel: int) -> None:
    model = replace(FLUX, parallel=parallel, token_pixels=16)
    width, height = dimensions_for_aspect(ratio, model)
    assert model.splits(width, height) and width % 16 == 0 and height % 16 == 0
    assert convert(model, aspect_ratio=ratio).width == width


def test_models_that_cannot_split_are_refused_before_any_collective() -> None:
    pipeline = build_tiny_flux(seed=0)  # 2 attention heads
    loaded = LoadedPipeline(pipeline=pipeline, family=TINY_FLUX, device="cpu", dtype=torch.float32)
    with pytest.raises(ParallelUnsupported, match="2 attention heads, which do not divide by 4"):
        parallelize(loaded, 4)
    with pytest.raises(ParallelUnsupported, match=r"no context-parallel plan for .*; use PARALLEL=1"):
        parallelize(LoadedPipeline(object(), TINY_FLUX, "cpu", torch.float32), 2)
    # The tiny FLUX's VAE halves each side once and its latents are packed 2×2: 4 pixels per token side.
    assert token_pixels(pipeline) == 4


def test_ring_p2p_runs_in_bf16_on_cuda_under_graphs_unless_told_otherwise() -> None:
    gpu = LoadedPipeline(object(), TINY_FLUX, "cuda:0", torch.bfloat16)
    assert ring_p2p_runs(gpu, ParallelAttention.AUTO, graphs=True) == (True, "")
    runs, why = ring_p2p_runs(gpu, ParallelAttention.AUTO, graphs=False)
    assert not runs and "CUDA graphs" in why
    runs, why = ring_p2p_runs(gpu, ParallelAttention.DIFFUSERS, graphs=True)
    assert not runs and why == "PARALLEL_ATTENTION=diffusers"
    for device, dtype in (("cpu", torch.bfloat16), ("cuda:0", torch.float32)):
        runs, why = ring_p2p_runs(
            LoadedPipeline(object(), TINY_FLUX, device, dtype), ParallelAttention.AUTO, graphs=True
        )
        assert not runs and "needs bf16 or fp16 on CUDA" in why


def test_where_the_gpus_cannot_share_memory_ulysses_needs_the_heads_to_divide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ring-p2p splits only the tokens; its fallback, Ulysses, gives each rank a whole share of the heads."""
    from diffuserve.engine.parallel import ring_p2p

    monkeypatch.setattr(context, "ring_p2p_runs", lambda *_, **__: (True, ""))
    monkeypatch.setattr(ring_p2p, "p2p_available", lambda *_: (False, "no peer access"))
    loaded = LoadedPipeline(build_tiny_flux(seed=0), TINY_FLUX, "cuda:0", torch.bfloat16)  # 2 heads
    with pytest.raises(
        ParallelUnsupported, match=r"2 attention heads, which do not divide by 4 \(no peer access\)"
    ):
        parallelize(loaded, 4, graphs=True)


def _rank_falls_back(rank: int, port: int, out) -> None:
    from diffusers.models import attention_dispatch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loaded = LoadedPipeline(build_tiny_flux(seed=0), TINY_FLUX, "cpu", torch.float32)
        pixels, attention = parallelize(loaded, 2, ParallelAttention.AUTO, graphs=True)
        out[rank] = (pixels, attention, attention_dispatch.TemplatedRingAttention.__name__)
    finally:
        dist.destroy_process_group()


def test_a_group_on_cpu_runs_diffusers_ulysses_and_says_why() -> None:
    out = spawn_ranks(2, _rank_falls_back)
    for rank in (0, 1):
        pixels, attention, ring_class = out[rank]
        assert pixels == 4 and attention.startswith("diffusers' Ulysses (ring-p2p needs bf16 or fp16 on CUDA")
        assert ring_class == "TemplatedRingAttention", "diffusers' own ring is left alone"


def _rank_decides(rank: int, port: int, current: torch.Tensor, reference: torch.Tensor, out) -> None:
    world = 2
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        share = slice(rank * current.shape[1] // world, (rank + 1) * current.shape[1] // world)
        out[rank] = torch.tensor(_relative_l1(current[:, share], reference[:, share], dist.group.WORLD))
    finally:
        dist.destroy_process_group()


def test_ranks_decide_on_the_whole_image_from_their_shares() -> None:
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 64, 8, generator=generator)
    # Sample 1 changes only in the second half of its tokens: a rank that looked at its own share alone
    # would see no change at all on rank 0.
    current = reference.clone()
    current[0] += 0.05 * torch.randn(64, 8, generator=generator)
    current[1, 32:] += 0.5
    whole = torch.tensor(_relative_l1(current, reference))
    out = spawn_ranks(2, _rank_decides, current, reference)
    assert torch.allclose(out[0], whole, rtol=1e-5) and torch.equal(out[0], out[1])
    assert out[0][1] > 0 and out[0][2] == 0
