"""The digits model's training objective, shared by the model's trainer and its adapters': rectified flow on
random batches of prompts and digit latents, with the text encoded as the served pipeline encodes it."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from diffuserve.models.digits.prompts import random_prompt, random_unconditional_prompt
from diffuserve.types import TINY_FLUX

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline

MAX_SEQUENCE_LENGTH = TINY_FLUX.max_sequence_length or 16


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def encode_prompts(
    pipe: FluxPipeline, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence, pooled CLIP) exactly as `FluxPipeline.encode_prompt` computes them, but cheaper: CLIP is
    causal and pools at the first </s>, so padding to the longest prompt instead of 77 gives the same vector.
    T5 sees no attention mask in the pipeline, so its padding is part of the input and is kept as served."""
    clip_ids = pipe.tokenizer(
        prompts, padding="longest", max_length=pipe.tokenizer_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = pipe.text_encoder(clip_ids).pooler_output
    t5_ids = pipe.tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    sequence = pipe.text_encoder_2(t5_ids)[0]
    return sequence, pooled


@dataclass
class FlowBatches:
    """train_flow's objective on random batches: prompts drawn per digit (a few unconditional), each over
    `repeats` images of its digit, noised to a random σ; the loss is the transformer's error on ε - x0. Draws
    from the given generators in a fixed order, so a seed gives the same batches."""

    pipe: Any
    packed: Any
    by_digit: list[Any]
    n_prompts: int
    repeats: int
    uncond_prob: float
    sigma_one_prob: float
    img_ids: Any
    text_ids: Any

    @classmethod
    def of(
        cls,
        pipe: FluxPipeline,
        latents: torch.Tensor,
        labels: np.ndarray,
        batch: int,
        repeats: int,
        uncond_prob: float,
        sigma_one_prob: float,
    ) -> FlowBatches:
        import torch

        n, c, h, w = latents.shape
        prompts = batch // repeats
        img_ids = pipe._prepare_latent_image_ids(
            prompts * repeats, h // 2, w // 2, torch.device("cpu"), latents.dtype
        )
        return cls(
            pipe,
            pipe._pack_latents(latents, n, c, h, w),
            [torch.from_numpy(np.flatnonzero(labels == d)) for d in range(10)],
            prompts,
            repeats,
            uncond_prob,
            sigma_one_prob,
            img_ids,
            torch.zeros(MAX_SEQUENCE_LENGTH, 3),
        )

    def loss(
        self, rng: random.Random, generator: torch.Generator, *, train_encoders: bool = True
    ) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        prompts: list[str] = []
        chosen: list[torch.Tensor] = []
        for _ in range(self.n_prompts):
            if rng.random() < self.uncond_prob:
                prompts.append(random_unconditional_prompt(rng))
                chosen.append(torch.randint(0, len(self.packed), (self.repeats,), generator=generator))
            else:
                digit = rng.randrange(10)
                prompts.append(random_prompt(digit, rng))
                pool = self.by_digit[digit]
                chosen.append(pool[torch.randint(0, len(pool), (self.repeats,), generator=generator)])
        with torch.set_grad_enabled(train_encoders and torch.is_grad_enabled()):
            sequence, pooled = encode_prompts(self.pipe, prompts, MAX_SEQUENCE_LENGTH)
        x0 = self.packed[torch.cat(chosen)]
        batch = len(x0)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.rand(batch, generator=generator)
        sigma = torch.where(torch.rand(batch, generator=generator) < self.sigma_one_prob, 1.0, sigma)
        s = sigma[:, None, None]
        pred = self.pipe.transformer(
            hidden_states=(1.0 - s) * x0 + s * noise,
            timestep=sigma,
            guidance=None,
            pooled_projections=pooled.repeat_interleave(self.repeats, dim=0),
            encoder_hidden_states=sequence.repeat_interleave(self.repeats, dim=0),
            txt_ids=self.text_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(pred, noise - x0)
