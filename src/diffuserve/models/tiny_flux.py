"""The tiny FLUX architecture (real FluxPipeline classes, laptop-sized) used by the built-in models."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffuserve.models.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_vocab,
)


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of every component; the defaults give a pipeline of well under a million parameters."""

    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 32)
    head_dim: int = 16
    heads: int = 2
    layers: int = 1
    single_layers: int = 1
    rope_axes: tuple[int, int, int] = (4, 6, 6)
    guidance_embeds: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tiny_flux(
    config: TinyFluxConfig | None = None, seed: int = 0, words: list[str] | None = None
) -> FluxPipeline:
    """A FluxPipeline with seeded random weights; the same seed always gives the same pipeline."""
    config = config or TinyFluxConfig()
    vocab = build_vocab(words)
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=config.text_dim,
            intermediate_size=config.text_dim * 2,
            num_attention_heads=config.text_heads,
            num_hidden_layers=config.text_layers,
            max_position_embeddings=77,
            projection_dim=config.text_dim,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=config.text_dim,
            d_ff=config.text_dim * 2,
            d_kv=config.text_dim // config.text_heads,
            num_heads=config.text_heads,
            num_layers=config.text_layers,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    )
    depth = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=config.latent_channels,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        layers_per_block=1,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.latent_channels * 4,
        num_layers=config.layers,
        num_single_layers=config.single_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=config.rope_axes,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=build_clip_tokenizer(vocab),
        text_encoder_2=t5.eval(),
        tokenizer_2=build_t5_tokenizer(vocab),
        transformer=transformer.eval(),
    )
