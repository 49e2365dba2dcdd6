"""Context parallelism's pieces: which sizes a worker group serves, models it refuses, and step-cache
decisions that every rank takes alike from its own share of the tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from diffuserve.engine.loader import LoadedPipeline
from diffuserve.engine.parallel import (
    ParallelUnsupported,
    check_attention,
    parallelize,
    resolve_attention,
    token_pixels,
)
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


def test_auto_attention_writes_into_peers_under_cuda_graphs_and_one_exchange_without() -> None:
    assert resolve_attention("auto", graphs=True) == "ring-p2p"
    assert resolve_attention("auto", graphs=False) == "ulysses"
    for chosen in ("ulysses", "ulysses-p2p", "ulysses-diffusers", "ring", "ring-p2p"):
        assert resolve_attention(chosen, graphs=True) == chosen
        assert resolve_attention(chosen, graphs=False) == chosen


def test_only_ulysses_needs_the_heads_to_divide() -> None:
    from diffuserve.engine.parallel import _check_heads

    model = build_tiny_flux(seed=0).transformer  # 2 attention heads
    for ring in ("ring", "ring-p2p"):
        _check_heads(model, "tiny", ring, 4)  # ring splits only the tokens
    for ulysses in ("ulysses", "ulysses-p2p", "ulysses-diffusers"):
        with pytest.raises(ParallelUnsupported, match="2 attention heads, which do not divide by 4"):
            _check_heads(model, "tiny", ulysses, 4)


@pytest.mark.parametrize("ring", ["ring", "ring-p2p"])
def test_ring_only_where_its_attention_kernels_run(ring: str) -> None:
    loaded = LoadedPipeline(build_tiny_flux(seed=0), TINY_FLUX, "cpu", torch.float32)
    with pytest.raises(ParallelUnsupported, match=f"PARALLEL_ATTENTION={ring} needs bf16 or fp16 on CUDA"):
        parallelize(loaded, 2, ring)
    check_attention(LoadedPipeline(object(), TINY_FLUX, "cuda:0", torch.bfloat16), ring)


def test_p2p_needs_gpus_and_auto_falls_back_where_it_cannot_run() -> None:
    loaded = LoadedPipeline(build_tiny_flux(seed=0), TINY_FLUX, "cpu", torch.float32)
    with pytest.raises(ParallelUnsupported, match=r"ulysses-p2p: it needs GPUs .*; use ulysses-diffusers"):
        parallelize(loaded, 2, "ulysses-p2p")


def _rank_falls_back(rank: int, port: int, out) -> None:
    from diffusers.models import attention_dispatch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loaded = LoadedPipeline(build_tiny_flux(seed=0), TINY_FLUX, "cpu", torch.float32)
        parallelize(loaded, 2, "ulysses-p2p", p2p_fallback="ulysses-diffusers")
        out[rank] = attention_dispatch.TemplatedUlyssesAttention.__name__
    finally:
        dist.destroy_process_group()


def test_p2p_falls_back_to_diffusers_ulysses_when_asked() -> None:
    out = spawn_ranks(2, _rank_falls_back)
    assert out[0] == out[1] == "TemplatedUlyssesAttention"


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


def _rank_runs_both_exchanges(rank: int, port: int, out) -> None:
    from unittest import mock

    from torch.distributed import _functional_collectives as funcol

    from diffuserve.engine.dispatch_override import restore_overrides
    from diffuserve.engine.ulysses import install_fused_qkv

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loaded = LoadedPipeline(build_tiny_flux(seed=0), TINY_FLUX, "cpu", torch.float32)
        parallelize(loaded, 2, "ulysses-diffusers")
        for name, install in (("diffusers", restore_overrides), ("fused", install_fused_qkv)):
            install()
            with mock.patch.object(funcol, "all_to_all_single", wraps=funcol.all_to_all_single) as spy:
                latents = loaded.pipeline(
                    prompt=["the digit 3"],
                    height=32,
                    width=32,
                    num_inference_steps=2,
                    guidance_scale=TINY_FLUX.default_guidance,
                    max_sequence_length=TINY_FLUX.max_sequence_length,
                    generator=[torch.Generator().manual_seed(5)],
                    output_type="latent",
                ).images
            out[(rank, name)] = (latents, spy.call_count)
    finally:
        restore_overrides()
        dist.destroy_process_group()


def test_one_exchange_for_q_k_and_v_gives_the_same_latents_as_diffusers_three() -> None:
    out = spawn_ranks(2, _rank_runs_both_exchanges)
    for rank in (0, 1):
        reference, diffusers_calls = out[(rank, "diffusers")]
        latents, fused_calls = out[(rank, "fused")]
        # Same bytes in the same layout reach the attention: the result is identical, not merely close.
        assert torch.equal(latents, reference)
        # Per attention: Q, K, V and the output (4), against one for Q, K and V and one for the output.
        assert diffusers_calls == 2 * fused_calls > 0
