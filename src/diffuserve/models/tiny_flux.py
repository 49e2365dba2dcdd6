"""The tiny FLUX architecture (real FluxPipeline classes, laptop-sized) used by the built-in models."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import FluxPipeline

from diffuserve.models.architectures import ClipSpec, PipelineSpec, T5Spec, VaeSpec, build_flux
from diffuserve.models.tokenizer import build_vocab


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

    def spec(self, vocab_size: int) -> PipelineSpec:
        dim, heads, layers = self.text_dim, self.text_heads, self.text_layers
        clip = {"hidden_size": dim, "intermediate_size": dim * 2, "num_attention_heads": heads}
        t5 = {"d_model": dim, "d_ff": dim * 2, "d_kv": dim // heads, "num_heads": heads}
        return PipelineSpec(
            denoiser={
                "patch_size": 1,
                "in_channels": self.latent_channels * 4,
                "num_layers": self.layers,
                "num_single_layers": self.single_layers,
                "attention_head_dim": self.head_dim,
                "num_attention_heads": self.heads,
                "joint_attention_dim": self.text_dim,
                "pooled_projection_dim": self.text_dim,
                "guidance_embeds": self.guidance_embeds,
                "axes_dims_rope": self.rope_axes,
            },
            clip=ClipSpec(
                {"vocab_size": vocab_size, "max_position_embeddings": 77, "num_hidden_layers": layers, **clip}
            ),
            second_encoder=T5Spec({"vocab_size": vocab_size, "num_layers": layers, **t5}),
            vae=VaeSpec(
                self.latent_channels,
                block_out_channels=self.vae_channels,
                layers_per_block=1,
                norm_num_groups=8,
                scaling_factor=1.0,
                shift_factor=0.0,
                quant_conv=False,
            ),
            scheduler={"shift": 1.0, "use_dynamic_shifting": False},
        )


def build_tiny_flux(
    config: TinyFluxConfig | None = None, seed: int = 0, words: list[str] | None = None
) -> FluxPipeline:
    """A FluxPipeline with seeded random weights; the same seed always gives the same pipeline."""
    config = config or TinyFluxConfig()
    torch.manual_seed(seed)
    return build_flux(config.spec(len(build_vocab(words))), words=words)
