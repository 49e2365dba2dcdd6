"""The two families on a Qwen3-4B text encoder: Z-Image-Turbo (a 6 B single-stream DiT, FLUX.1's VAE) and FLUX.2
klein 4B (FLUX.2's transformer and VAE), as their pipelines with random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffuserve.models.architectures import FLUX_VAE, VaeSpec, build_vae, construct_on
from diffuserve.models.qwen_encoders import QWEN3_4B, build_qwen3, qwen_tokenizer


@dataclass(frozen=True)
class ZImageSpec:
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: VaeSpec
    scheduler: dict[str, Any]


@dataclass(frozen=True)
class Flux2KleinSpec:
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    # AutoencoderKLFlux2's arguments: its defaults are the released FLUX.2 VAE.
    vae: dict[str, Any] = field(default_factory=dict)
    # Step-distilled (model_index.json `is_distilled`): no classifier-free guidance.
    is_distilled: bool = True


# Tongyi-MAI/Z-Image-Turbo: transformer/config.json (30 blocks of dim 3840 plus 2+2 refiners: 6.15 B),
# text_encoder/config.json (Qwen3-4B), vae/config.json (FLUX.1's 16-channel VAE), scheduler/scheduler_config.json.
Z_IMAGE_TURBO = ZImageSpec(
    transformer={
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 3840,
        "n_layers": 30,
        "n_refiner_layers": 2,
        "n_heads": 30,
        "n_kv_heads": 30,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": 2560,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    },
    text_encoder=QWEN3_4B,
    vae=FLUX_VAE,
    scheduler={"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
)
# black-forest-labs/FLUX.2-klein-4B: transformer/config.json (5 double + 20 single blocks of 24 heads of 128;
# the klein-4b entry of diffusers' scripts/convert_flux2_to_diffusers.py), text_encoder/config.json (Qwen3-4B,
# whose layers 9, 18 and 27 make the 3 × 2560 = 7680-wide text input), vae/config.json (AutoencoderKLFlux2's
# defaults), scheduler/scheduler_config.json.
FLUX2_KLEIN_4B = Flux2KleinSpec(
    transformer={
        "patch_size": 1,
        "in_channels": 128,
        "num_layers": 5,
        "num_single_layers": 20,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 7680,
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (32, 32, 32, 32),
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,
    },
    text_encoder=QWEN3_4B,
    scheduler={
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "time_shift_type": "exponential",
    },
)


def build_z_image(
    spec: ZImageSpec,
    *,
    words: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A ZImagePipeline with random weights (seed torch first)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tokenizer = qwen_tokenizer(words)
    with construct_on(device, dtype):
        text_encoder = build_qwen3(spec.text_encoder, tokenizer, causal_lm=False)
        vae, transformer = build_vae(spec.vae), ZImageTransformer2DModel(**spec.transformer).eval()
        with torch.no_grad():
            # Created with torch.empty (the checkpoint fills them): uninitialised memory may hold NaNs.
            for pad in (transformer.x_pad_token, transformer.cap_pad_token):
                pad.normal_(std=0.02)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_flux2_klein(
    spec: Flux2KleinSpec,
    *,
    words: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A Flux2KleinPipeline with random weights (seed torch first)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    tokenizer = qwen_tokenizer(words)
    with construct_on(device, dtype):
        text_encoder = build_qwen3(spec.text_encoder, tokenizer, causal_lm=True)
        vae = AutoencoderKLFlux2(**spec.vae).eval()
        transformer = Flux2Transformer2DModel(**spec.transformer).eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=spec.is_distilled,
    )
