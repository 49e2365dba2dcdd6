"""Tiny versions of every family's real pipeline (the same classes, a few small layers, seeded random weights):
laptop-sized built-in models that run each family's code path end to end on a CPU in a second or so."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from diffuserve.models.architectures import ClipSpec, T5Spec, VaeSpec, build_flux
from diffuserve.models.tiny_flux import TinyFluxConfig
from diffuserve.models.tokenizer import build_vocab

_VOCAB = len(build_vocab())
_SMALL_VAE = {"block_out_channels": (8, 8), "layers_per_block": 1, "norm_num_groups": 8}
# Qwen2.5-VL's and Qwen3's shapes at width 16: 2 heads of 8 (M-RoPE's sections halve a head: 1 + 1 + 2).
_QWEN25_VL = {
    "text_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 152064,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": 16,
        "fullatt_block_indexes": [0],
    },
    "vocab_size": 152064,
}


def _qwen3(layers: int) -> dict[str, Any]:
    return {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }


def tiny_flux_kontext() -> Any:
    # An 8× VAE as the real one: Kontext resizes the picture to about a megapixel before encoding it.
    config = TinyFluxConfig(vae_channels=(8, 8, 8, 8), guidance_embeds=True)
    return build_flux(config.spec(_VOCAB), pipeline_class="FluxKontextPipeline")


def tiny_sd35() -> Any:
    from diffuserve.models.arch_sd3 import Sd3Spec, build_sd3

    clip = {
        "vocab_size": _VOCAB,
        "max_position_embeddings": 77,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    spec = Sd3Spec(
        transformer={
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 16,
            "pooled_projection_dim": 32,
            "pos_embed_max_size": 32,
            "qk_norm": "rms_norm",
            "dual_attention_layers": (0,),  # medium's second attention, in block 0
        },
        clip_l=ClipSpec({**clip, "hidden_size": 16, "intermediate_size": 32}, with_projection=True),
        clip_g=ClipSpec({**clip, "hidden_size": 16, "intermediate_size": 32}, with_projection=True),
        t5=T5Spec(
            {"vocab_size": _VOCAB, "d_model": 32, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1}
        ),
        vae=VaeSpec(4, scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False, **_SMALL_VAE),  # type: ignore[arg-type]
        scheduler={"num_train_timesteps": 1000, "shift": 3.0},
        t5_max_length=32,
    )
    return build_sd3(spec)


def _tiny_qwen_image(edit: bool) -> Any:
    from diffuserve.models.arch_qwen_image import QWEN_IMAGE, QwenImageSpec, build_qwen_image

    spec = QwenImageSpec(
        transformer={
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 4,
            "num_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 16,
            "axes_dims_rope": (4, 6, 6),
        },
        text_encoder=_QWEN25_VL,
        # A 16× VAE: the edit pipeline resizes the picture to a megapixel, whatever the output size.
        vae={
            "base_dim": 8,
            "z_dim": 4,
            "dim_mult": [1, 1, 1, 1, 1],
            "num_res_blocks": 1,
            "temperal_downsample": [False, True, True, True],
            "latents_mean": [0.0] * 4,
            "latents_std": [1.0] * 4,
        },
        scheduler=QWEN_IMAGE.scheduler,
        image_processor={"min_pixels": 3136, "max_pixels": 50176},
    )
    return build_qwen_image(spec, edit=edit)


def tiny_z_image() -> Any:
    from diffuserve.models.arch_qwen3 import ZImageSpec, build_z_image

    spec = ZImageSpec(
        transformer={
            "all_patch_size": (2,),
            "all_f_patch_size": (1,),
            "in_channels": 4,
            "dim": 32,
            "n_layers": 1,
            "n_refiner_layers": 1,
            "n_heads": 2,
            "n_kv_heads": 2,
            "qk_norm": True,
            "cap_feat_dim": 16,
            "axes_dims": [8, 4, 4],
            "axes_lens": [256, 64, 64],
        },
        text_encoder=_qwen3(2),
        vae=VaeSpec(4, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False, **_SMALL_VAE),  # type: ignore[arg-type]
        scheduler={"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    )
    return build_z_image(spec)


def tiny_flux2_klein() -> Any:
    from diffuserve.models.arch_qwen3 import FLUX2_KLEIN_4B, Flux2KleinSpec, build_flux2_klein

    spec = Flux2KleinSpec(
        transformer={
            "patch_size": 1,
            "in_channels": 16,
            "num_layers": 1,
            "num_single_layers": 1,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 48,
            "timestep_guidance_channels": 16,
            "axes_dims_rope": (4, 4, 4, 4),
            "guidance_embeds": False,
        },
        # The pipeline reads the text encoder's layers 9, 18 and 27 (3 × 16 = the transformer's 48).
        text_encoder=_qwen3(27),
        scheduler=FLUX2_KLEIN_4B.scheduler,
        vae={
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4,
            "sample_size": 32,
            **_SMALL_VAE,
        },
    )
    return build_flux2_klein(spec)


TINY_FAMILY_BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny-flux-kontext": tiny_flux_kontext,
    "tiny-sd35": tiny_sd35,
    "tiny-qwen-image": lambda: _tiny_qwen_image(edit=False),
    "tiny-qwen-image-edit": lambda: _tiny_qwen_image(edit=True),
    "tiny-z-image": tiny_z_image,
    "tiny-flux2-klein": tiny_flux2_klein,
}


def build_tiny_family(name: str, seed: int = 0) -> Any:
    """The tiny pipeline `name` (a key of TINY_FAMILY_BUILDERS); the same seed always gives the same one."""
    torch.manual_seed(seed)
    return TINY_FAMILY_BUILDERS[name]()
