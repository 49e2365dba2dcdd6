"""A group's joint VAE decode: each rank decodes a band of rows (DistVAE over gloo here), and together they give
the image that one process decodes whole; previews still decode alone on the leader."""

from __future__ import annotations

import datetime
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, AutoencoderTiny

from diffuserve.engine.frames import plain_decode
from diffuserve.engine.parallel.split_decode import BandGroupNorm, split_vae_decode
from tests.helpers import spawn_ranks


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def _rank_decodes(rank: int, port: int, world: int, rows: int, out: Any) -> None:
    # A short timeout: a decode that waited on a peer that never comes fails the test instead of hanging it.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        vae = tiny_vae()
        pipeline = SimpleNamespace(vae=vae)
        latents = torch.randn(2, 4, rows, 6, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            whole = vae.decode(latents, return_dict=False)[0]
            why = split_vae_decode(pipeline, world)
            forward = BandGroupNorm.forward
            with (
                mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as reductions,
                mock.patch.object(BandGroupNorm, "forward", autospec=True, side_effect=forward) as norms,
            ):
                joint = vae.decode(latents, return_dict=False)[0]
            out[rank] = (
                why,
                whole,
                joint,
                reductions.call_count,
                type(vae.decoder).__name__,
                norms.call_count,
            )
            dist.barrier()
            if rank == 0:  # a preview: the leader alone, while its peer only waits at the barrier below
                out["alone"] = plain_decode(vae)(latents, return_dict=False)[0]
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_decode_bands_that_make_the_whole_image(world: int) -> None:
    out = spawn_ranks(world, _rank_decodes, world, 10)
    whole = out[0][1]
    for rank in range(world):
        why, _, joint, reductions, decoder, _ = out[rank]
        assert why is None
        # Group norm statistics summed across ranks: fp32 arithmetic in another order, nothing more.
        assert torch.allclose(joint, whole, atol=1e-5, rtol=0), (joint - whole).abs().max()
        assert torch.equal(joint, out[0][2]), "every rank ends with the same image"
        assert reductions > 0, "the decode ran split (its group norms reduce across the ranks)"
        assert decoder == "Decoder", "the plain decoder is back after the joint decode"
        assert out[rank][5] == reductions, "each group norm is one BandGroupNorm: one reduction each"
    assert torch.equal(out["alone"], whole), "a preview decodes whole, on the leader alone"


def test_fewer_latent_rows_than_ranks_decode_whole_on_every_rank() -> None:
    out = spawn_ranks(3, _rank_decodes, 3, 2)
    for rank in range(3):
        why, whole, joint, reductions, _, _ = out[rank]
        assert why is None and reductions == 0
        assert torch.equal(joint, whole)


def _rank_normalises(rank: int, port: int, out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
        # Two images whose groups sit well off zero: the one-pass variance must still hold.
        whole = torch.randn(2, 32, 7, 5, generator=torch.Generator().manual_seed(1)) * 3 + 5
        band = whole[:, :, :4] if rank == 0 else whole[:, :, 4:]
        norm.parallel_context = SimpleNamespace(group=dist.group.WORLD)  # as DistVAE's norms carry it
        with torch.no_grad():
            out[rank] = (
                BandGroupNorm(norm)(band),
                norm(whole)[:, :, :4] if rank == 0 else norm(whole)[:, :, 4:],
            )
    finally:
        dist.destroy_process_group()


def test_a_band_group_norm_is_the_whole_image_group_norm_of_its_rows() -> None:
    out = spawn_ranks(2, _rank_normalises)
    for rank in (0, 1):
        band, expected = out[rank]
        assert torch.allclose(band, expected, atol=1e-5, rtol=0), (band - expected).abs().max()


def test_a_vae_without_an_adapter_keeps_its_decode() -> None:
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    )
    decode = vae.decode
    why = split_vae_decode(SimpleNamespace(vae=vae), 2)
    assert why is not None and "AutoencoderTiny" in why
    assert vae.decode == decode
    assert split_vae_decode(SimpleNamespace(vae=tiny_vae()), 1) == "one rank: nothing to split"
