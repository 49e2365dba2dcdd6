"""Pipeline architectures from configs: the shared encoders and VAE, and the builders of FLUX.1 (also Kontext)
and SDXL, for the tiny built-in FLUX and the real models alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from diffuserve.models.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    build_clip_tokenizer,
    build_t5_tokenizer,
    build_vocab,
)


@dataclass(frozen=True)
class ClipSpec:
    """A CLIP text encoder: CLIPTextConfig's arguments (as in the released config.json)."""

    config: dict[str, Any]
    with_projection: bool = False  # SDXL's second encoder also returns the pooled, projected embedding


@dataclass(frozen=True)
class T5Spec:
    """A T5 encoder: T5Config's arguments (as in the released config.json)."""

    config: dict[str, Any]


@dataclass(frozen=True)
class VaeSpec:
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    scaling_factor: float
    shift_factor: float | None
    quant_conv: bool
    norm_num_groups: int = 32
    sample_size: int = 32


@dataclass(frozen=True)
class PipelineSpec:
    """A FluxPipeline or StableDiffusionXLPipeline: the denoiser's constructor arguments (FLUX transformer or
    UNet), the encoders (CLIP and T5 for FLUX, two CLIPs for SDXL), the VAE and the scheduler's arguments."""

    denoiser: dict[str, Any]
    clip: ClipSpec
    second_encoder: T5Spec | ClipSpec
    vae: VaeSpec
    scheduler: dict[str, Any]
    # The T5 tokenizer's limit for both FLUX models: schnell's pipeline asks for 256 tokens, but may be asked for 512.
    t5_max_length: int = 512


# The released models' configs (reference/architectures.md); the encoders keep the real vocabulary sizes.
_CLIP = {"vocab_size": 49408, "max_position_embeddings": 77}
CLIP_L = ClipSpec(
    {
        **_CLIP,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
    }
)
CLIP_BIG_G = ClipSpec(
    {
        **_CLIP,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "hidden_act": "gelu",
    },
    with_projection=True,
)
T5_XXL = T5Spec(
    {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "feed_forward_proj": "gated-gelu",
    }
)
BIG_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 1024}
FLUX_VAE = VaeSpec(16, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False, **BIG_VAE)  # type: ignore[arg-type]
SDXL_VAE = VaeSpec(4, scaling_factor=0.13025, shift_factor=None, quant_conv=True, **BIG_VAE)  # type: ignore[arg-type]
_FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
_FLUX_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}
FLUX_DEV = PipelineSpec(
    denoiser={**_FLUX_TRANSFORMER, "guidance_embeds": True},
    clip=CLIP_L,
    second_encoder=T5_XXL,
    vae=FLUX_VAE,
    # dev's scheduler shifts with resolution; schnell's does not.
    scheduler={
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
)
FLUX_SCHNELL = PipelineSpec(
    denoiser={**_FLUX_TRANSFORMER, "guidance_embeds": False},
    clip=CLIP_L,
    second_encoder=T5_XXL,
    vae=FLUX_VAE,
    scheduler=_FLUX_SCHEDULER,
)
# black-forest-labs/FLUX.1-Kontext-dev: transformer/config.json and scheduler/scheduler_config.json are FLUX.1-dev's
# (12 B, guidance embedding); the pipeline (FluxKontextPipeline) adds the picture's tokens to the sequence.
FLUX_KONTEXT = FLUX_DEV
SDXL = PipelineSpec(
    denoiser={
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    clip=CLIP_L,
    second_encoder=CLIP_BIG_G,
    vae=SDXL_VAE,
    scheduler={
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    },
)


@contextlib.contextmanager
def construct_on(device: str | None, dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters in their final dtype on the device: 12 B fp32 params would not fit through the CPU."""
    if device is None or dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # only floating dtypes, which bf16/fp16/fp32 all are
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_clip(spec: ClipSpec) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Our word-level tokenizer's ids; eos_token_id != 2 makes CLIP pool at the first </s> instead of the argmax id.
    ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    config = CLIPTextConfig(**{"projection_dim": spec.config["hidden_size"], **ids, **spec.config})
    model = CLIPTextModelWithProjection(config) if spec.with_projection else CLIPTextModel(config)
    return model.eval()


def build_t5(spec: T5Spec) -> Any:
    from transformers import T5Config, T5EncoderModel

    ids = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID}
    return T5EncoderModel(T5Config(**ids, **spec.config)).eval()


def build_vae(spec: VaeSpec) -> Any:
    from diffusers import AutoencoderKL

    depth = len(spec.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=spec.latent_channels,
        block_out_channels=spec.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.sample_size,
        scaling_factor=spec.scaling_factor,
        shift_factor=spec.shift_factor,
        use_quant_conv=spec.quant_conv,
        use_post_quant_conv=spec.quant_conv,
        # SDXL's real VAE config asks for an fp32 upcast only under fp16; bf16 (our GPU dtype) needs none.
        force_upcast=True,
    ).eval()


def build_flux(
    spec: PipelineSpec,
    *,
    words: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    pipeline_class: str = "FluxPipeline",
) -> Any:
    """A FluxPipeline (or FLUX.1 Kontext's FluxKontextPipeline: the same components) with random weights (seed
    torch first), built on `device` in `dtype` when given.

    Tokenizers are the project's word-level ones (no download); the pipelines pad to the real lengths."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if not isinstance(spec.second_encoder, T5Spec):
        raise ValueError("a FLUX pipeline's second text encoder is a T5")
    vocab = build_vocab(words)
    with construct_on(device, dtype):
        clip, t5, vae = build_clip(spec.clip), build_t5(spec.second_encoder), build_vae(spec.vae)
        transformer = FluxTransformer2DModel(**spec.denoiser).eval()
    # Schedulers stay outside: their tables must be float32 on the CPU, as from_pretrained makes them.
    return getattr(diffusers, pipeline_class)(
        scheduler=FlowMatchEulerDiscreteScheduler(**spec.scheduler),
        vae=vae,
        text_encoder=clip,
        tokenizer=build_clip_tokenizer(vocab),
        text_encoder_2=t5,
        tokenizer_2=build_t5_tokenizer(vocab, max_length=spec.t5_max_length),
        transformer=transformer,
    )


def build_sdxl(spec: PipelineSpec, *, device: str | None = None, dtype: torch.dtype | None = None) -> Any:
    """A StableDiffusionXLPipeline with random weights (seed torch first)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if not isinstance(spec.second_encoder, ClipSpec):
        raise ValueError("an SDXL pipeline's second text encoder is a CLIP")
    vocab = build_vocab()
    with construct_on(device, dtype):
        clip, big_clip, vae = build_clip(spec.clip), build_clip(spec.second_encoder), build_vae(spec.vae)
        unet = UNet2DConditionModel(**spec.denoiser).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=clip,
        text_encoder_2=big_clip,
        tokenizer=build_clip_tokenizer(vocab),
        tokenizer_2=build_clip_tokenizer(vocab),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**spec.scheduler),
        force_zeros_for_empty_prompt=True,
    )
