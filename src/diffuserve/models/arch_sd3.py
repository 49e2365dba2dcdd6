"""Stable Diffusion 3.5 large and medium: SD3's MMDiT, three text encoders (CLIP-L, OpenCLIP bigG, T5-XXL) and a
16-channel VAE, as a StableDiffusion3Pipeline with random weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffuserve.models.architectures import (
    BIG_VAE,
    CLIP_BIG_G,
    CLIP_L,
    T5_XXL,
    ClipSpec,
    T5Spec,
    VaeSpec,
    build_clip,
    build_t5,
    build_vae,
    construct_on,
)
from diffuserve.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer, build_vocab


@dataclass(frozen=True)
class Sd3Spec:
    transformer: dict[str, Any]
    clip_l: ClipSpec
    clip_g: ClipSpec
    t5: T5Spec
    vae: VaeSpec
    scheduler: dict[str, Any]
    # The pipeline's T5 padding (its max_sequence_length default, 256).
    t5_max_length: int = 256


# stabilityai/stable-diffusion-3.5-large and -medium: transformer/config.json (38 blocks of 38 heads: 8.1 B;
# 24 blocks of 24 heads with a second self-attention in blocks 0-12, "MMDiT-X": 2.5 B), vae/config.json,
# scheduler/scheduler_config.json; both text encoders are CLIPTextModelWithProjection, the third T5-XXL.
_SD35 = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
    "qk_norm": "rms_norm",
}
SD3_VAE = VaeSpec(16, scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False, **BIG_VAE)  # type: ignore[arg-type]
_SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
_ENCODERS = {"clip_l": ClipSpec(CLIP_L.config, with_projection=True), "clip_g": CLIP_BIG_G, "t5": T5_XXL}
SD35_LARGE = Sd3Spec(
    transformer={
        **_SD35,
        "num_layers": 38,
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "pos_embed_max_size": 192,
    },
    vae=SD3_VAE,
    scheduler=_SD3_SCHEDULER,
    **_ENCODERS,  # type: ignore[arg-type]
)
SD35_MEDIUM = Sd3Spec(
    transformer={
        **_SD35,
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)),
    },
    vae=SD3_VAE,
    scheduler=_SD3_SCHEDULER,
    **_ENCODERS,  # type: ignore[arg-type]
)


def build_sd3(
    spec: Sd3Spec,
    *,
    words: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A StableDiffusion3Pipeline with random weights (seed torch first)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    vocab = build_vocab(words)
    with construct_on(device, dtype):
        clip_l, clip_g, t5 = build_clip(spec.clip_l), build_clip(spec.clip_g), build_t5(spec.t5)
        vae, transformer = build_vae(spec.vae), SD3Transformer2DModel(**spec.transformer).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        # Outside the dtype context: the scheduler's tables stay float32 on the CPU.
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=build_clip_tokenizer(vocab),
        text_encoder_2=clip_g,
        tokenizer_2=build_clip_tokenizer(vocab),
        text_encoder_3=t5,
        tokenizer_3=build_t5_tokenizer(vocab, max_length=spec.t5_max_length),
    )
