"""Qwen-Image and Qwen-Image-Edit: the 20 B MMDiT, Qwen2.5-VL-7B as text encoder (the edit model also shows it
the picture, through Qwen2VLProcessor) and the Qwen-Image VAE, as their pipelines with random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from diffuserve.models.architectures import construct_on
from diffuserve.models.qwen_encoders import (
    QWEN25_VL_7B,
    QWEN_VL_IMAGE_PROCESSOR,
    build_qwen25_vl,
    build_qwen_vl_processor,
    qwen_tokenizer,
)


@dataclass(frozen=True)
class QwenImageSpec:
    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    # AutoencoderKLQwenImage's arguments; its defaults are the released config (latents_mean/std included).
    vae: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    image_processor: dict[str, Any] = field(default_factory=lambda: dict(QWEN_VL_IMAGE_PROCESSOR))


# Qwen/Qwen-Image and Qwen/Qwen-Image-Edit: transformer/config.json (60 blocks, 24 heads of 128: 20.4 B),
# vae/config.json (= AutoencoderKLQwenImage's defaults), scheduler/scheduler_config.json.
QWEN_IMAGE = QwenImageSpec(
    transformer={
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    },
    text_encoder=QWEN25_VL_7B,
    scheduler={
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
    },
)


def build_qwen_image(
    spec: QwenImageSpec,
    *,
    edit: bool = False,
    words: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """QwenImagePipeline, or QwenImageEditPipeline (`edit`), with random weights (seed torch first)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = qwen_tokenizer(words)
    with construct_on(device, dtype):
        text_encoder = build_qwen25_vl(spec.text_encoder, tokenizer)
        vae = AutoencoderKLQwenImage(**spec.vae).eval()
        transformer = QwenImageTransformer2DModel(**spec.transformer).eval()
    parts = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }
    if not edit:
        return QwenImagePipeline(**parts)
    return QwenImageEditPipeline(**parts, processor=build_qwen_vl_processor(tokenizer, spec.image_processor))
