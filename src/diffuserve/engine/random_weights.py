"""Random-weight mode: the real FLUX.1 / SDXL architectures built with random weights directly on the device."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Parameter counts of the released models' configs; a build that misses one by more than 0.1 % is wrong (the counts are rounded to 4 digits).
EXPECTED_PARAMS: dict[str, dict[str, float]] = {
    "flux-dev": {"transformer": 11.90e9, "vae": 83.82e6, "text_encoder": 123.06e6, "text_encoder_2": 4.762e9},
    "flux-schnell": {
        "transformer": 11.89e9,
        "vae": 83.82e6,
        "text_encoder": 123.06e6,
        "text_encoder_2": 4.762e9,
    },
    "sdxl": {"unet": 2.567e9, "vae": 83.65e6, "text_encoder": 123.06e6, "text_encoder_2": 694.66e6},
}
PARAM_TOLERANCE = 0.001
# The T5 tokenizer's limit for both FLUX models: schnell's pipeline asks for 256 tokens, but may be asked for 512.
T5_MAX_LENGTH = 512


@dataclass(frozen=True)
class RandomArch:
    """Which real architecture a repo id names."""

    name: str


def arch_for_repo(repo: str) -> RandomArch:
    """FLUX.1-dev, FLUX.1-schnell or SDXL from the repo id; anything else is refused with the choices."""
    lowered = repo.lower()
    if "flux" in lowered and "schnell" in lowered:
        return RandomArch("flux-schnell")
    if "flux" in lowered:
        return RandomArch("flux-dev")
    if "xl" in lowered:
        return RandomArch("sdxl")
    raise ValueError(
        f"--weights random knows FLUX.1-dev, FLUX.1-schnell and SDXL; {repo!r} names none of them "
        "(e.g. black-forest-labs/FLUX.1-dev, black-forest-labs/FLUX.1-schnell, "
        "stabilityai/stable-diffusion-xl-base-1.0)"
    )


@contextlib.contextmanager
def _construct_on(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters in their final dtype on the device: 12 B fp32 params would not fit through the CPU."""
    previous = torch.get_default_dtype()
    # set_default_dtype only takes floating dtypes; bf16/fp16/fp32 all are.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _clip_config(big: bool) -> Any:
    from transformers import CLIPTextConfig

    from diffuserve.models.tokenizer import BOS_ID, EOS_ID, PAD_ID

    # eos_token_id != 2 makes CLIP pool at the first </s> of our word-level tokenizer instead of the argmax id.
    common = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
    }
    if big:
        return CLIPTextConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            hidden_act="gelu",
            projection_dim=1280,
            eos_token_id=EOS_ID,
            **common,
        )
    return CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        hidden_act="quick_gelu",
        projection_dim=768,
        eos_token_id=EOS_ID,
        **common,
    )


def _vae(latent_channels: int, scaling: float, shift: float | None, quant_conv: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        sample_size=1024,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
        # SDXL's real VAE config asks for an fp32 upcast only under fp16; bf16 (our GPU dtype) needs none.
        force_upcast=True,
    )


def _flux_models(dev: bool) -> tuple[Any, Any, Any, Any]:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffuserve.models.tokenizer import EOS_ID, PAD_ID

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=dev,
        axes_dims_rope=(16, 56, 56),
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=24,
            feed_forward_proj="gated-gelu",
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    )
    clip = CLIPTextModel(_clip_config(big=False))
    vae = _vae(16, 0.3611, 0.1159, quant_conv=False)
    return transformer, t5, clip, vae


def _build_flux(arch: RandomArch, device: str, dtype: torch.dtype) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from diffuserve.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer, build_vocab

    dev = arch.name == "flux-dev"
    with _construct_on(device, dtype):
        transformer, t5, clip, vae = _flux_models(dev)
    # Schedulers stay outside the context: their tables must be float32 on the CPU, as from_pretrained makes them.
    # The real repos' scheduler configs: dev shifts with resolution, schnell does not.
    if dev:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    vocab = build_vocab()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=build_clip_tokenizer(vocab, max_length=77),
        text_encoder_2=t5.eval(),
        tokenizer_2=build_t5_tokenizer(vocab, max_length=T5_MAX_LENGTH),
        transformer=transformer.eval(),
    )


def _sdxl_models() -> tuple[Any, Any, Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = _vae(4, 0.13025, None, quant_conv=True)
    clip = CLIPTextModel(_clip_config(big=False))
    big_clip = CLIPTextModelWithProjection(_clip_config(big=True))
    return unet, vae, clip, big_clip


def _build_sdxl(device: str, dtype: torch.dtype) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from diffuserve.models.tokenizer import build_clip_tokenizer, build_vocab

    with _construct_on(device, dtype):
        unet, vae, clip, big_clip = _sdxl_models()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    vocab = build_vocab()
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=clip.eval(),
        text_encoder_2=big_clip.eval(),
        tokenizer=build_clip_tokenizer(vocab, max_length=77),
        tokenizer_2=build_clip_tokenizer(vocab, max_length=77),
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def param_report(pipeline: Any, arch_name: str) -> dict[str, tuple[int, float, bool]]:
    """Per component: (params, expected, within tolerance)."""
    report = {}
    for name, expected in EXPECTED_PARAMS[arch_name].items():
        actual = count_params(getattr(pipeline, name))
        report[name] = (actual, expected, abs(actual - expected) / expected <= PARAM_TOLERANCE)
    return report


def build_random_pipeline(repo: str, *, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """The real architecture named by `repo`, random weights made on `device` in `dtype` (meta: no memory).

    Tokenizers are the project's word-level ones (no download): ids stay inside CLIP's 49408 and T5's 32128
    vocabularies and the pipelines pad to the real lengths (77, and 256/512 for T5), so the text encoders do
    the same work as with the real tokenizers; only the words → ids mapping differs.
    """
    arch = arch_for_repo(repo)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    pipeline = (
        _build_flux(arch, device, dtype) if arch.name.startswith("flux") else _build_sdxl(device, dtype)
    )
    report = param_report(pipeline, arch.name)
    for name, (actual, expected, ok) in report.items():
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "random %s %s: %.4g params (reference %.4g)", arch.name, name, actual, expected)
    if not all(ok for _, _, ok in report.values()):
        raise RuntimeError(f"random {arch.name} does not match the reference parameter counts: {report}")
    return pipeline
