"""Streaming previews: a denoising-step callback that decodes a running batch's latents at chosen steps, for
the requests that asked for partial images."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from diffuserve.engine.edits import keep_outside_mask
from diffuserve.engine.frames import plain_decode, to_uint8
from diffuserve.messages import Preview, PreviewBatch
from diffuserve.types import BatchJob

# From this size on (both sides, in pixels) a preview decodes the latents pooled 2×2 and scales the picture
# back up: a quarter of the VAE's work, for a preview that is only a little softer.
POOLED_PREVIEW_MIN_SIDE = 512


def preview_steps(total: int, wanted: int) -> list[int]:
    """The 0-based steps after which to take `wanted` previews of a `total`-step run: spread evenly, never the
    last step (that one is the final image), so a short run gives fewer."""
    picked = {math.ceil(total * (j + 1) / (wanted + 1)) - 1 for j in range(wanted)}
    return sorted(step for step in picked if 0 <= step < total - 1)


class PreviewTaker:
    """Called at each denoising step's end (after the pipeline's own update of the latents): at a step some
    item previews, it estimates the clean latents, decodes the rows of those items and hands them over."""

    def __init__(
        self, pipeline: Any, job: BatchJob, sink: Callable[[PreviewBatch], None], layout: str = "auto"
    ) -> None:
        self.pipeline = pipeline
        # How the family lays out its latents (Family.previews); "auto": FLUX-packed where the pipeline packs.
        self.layout = (
            layout if layout != "auto" else "packed" if hasattr(pipeline, "_unpack_latents") else "latents"
        )
        self.job = job
        self.sink = sink
        self._previous: Any = None
        self._taken = [0] * len(job.items)
        ends = list(itertools.accumulate(len(item.seeds) for item in job.items))
        self._rows = [
            list(range(end - len(item.seeds), end)) for end, item in zip(ends, job.items, strict=True)
        ]

    @property
    def wanted(self) -> bool:
        return any(item.partial_images > 0 for item in self.job.items)

    def __call__(self, step: int, latents: Any) -> None:
        total = int(getattr(self.pipeline, "_num_timesteps", 0) or self.job.steps)
        due = [
            index
            for index, item in enumerate(self.job.items)
            if item.partial_images and step in preview_steps(total, item.partial_images)
        ]
        if due:
            rows = [row for index in due for row in self._rows[index]]
            pixels, _ = to_uint8(self._decode(self._clean_estimate(latents), rows))
            batch, cursor = PreviewBatch(self.job), 0
            for index in due:
                count = len(self._rows[index])
                batch.previews.append(Preview(index, self._taken[index], pixels[cursor : cursor + count]))
                self._taken[index] += 1
                cursor += count
            self.sink(batch)
        self._previous = latents

    def _clean_estimate(self, latents: Any) -> Any:
        """The denoised latents this step points at. For Euler-type schedulers (FLUX's flow matching, SDXL's
        Euler), x0 = x − σ·d with d = (x − x_prev) / (σ − σ_prev); without the last step's latents or sigmas,
        the noisy latents themselves."""
        scheduler = self.pipeline.scheduler
        sigmas = getattr(scheduler, "sigmas", None)
        index = getattr(scheduler, "step_index", None)
        if self._previous is None or sigmas is None or index is None or not 0 < index < len(sigmas):
            return latents
        sigma, sigma_prev = float(sigmas[index]), float(sigmas[index - 1])
        if sigma == sigma_prev:
            return latents
        current, previous = latents.float(), self._previous.float()
        slope = (current - previous) / (sigma - sigma_prev)
        return (current - sigma * slope).to(latents.dtype)

    def _decode(self, latents: Any, rows: list[int]) -> Any:
        import torch

        pipeline, job = self.pipeline, self.job
        vae = pipeline.vae
        latents = self._vae_latents(latents[rows])
        pooled = min(job.width, job.height) >= POOLED_PREVIEW_MIN_SIDE
        if pooled:
            latents = torch.nn.functional.avg_pool2d(latents, 2)
        frames = self.layout == "packed-frames"  # Qwen's video VAE decodes B×C×frames×h×w
        decoder_input = latents.unsqueeze(2) if frames else latents
        # Not a group's joint decode, which needs every rank: previews are the leader's alone.
        images = plain_decode(vae)(decoder_input.to(vae.dtype), return_dict=False)[0]
        images = images[:, :, 0] if frames else images
        if pooled:
            images = torch.nn.functional.interpolate(images, size=(job.height, job.width), mode="bilinear")
        images = pipeline.image_processor.postprocess(images, output_type="pt")
        return keep_outside_mask(images, job, rows)

    def _vae_latents(self, latents: Any) -> Any:
        """B×C×h×w latents in the VAE's own scale, from the denoiser's layout."""
        import torch

        pipeline, job, layout = self.pipeline, self.job, self.layout
        scale = int(pipeline.vae_scale_factor)
        if layout == "patchified":  # FLUX.2: tokens of 2×2 patches, batch-normed; undone as its pipeline does
            rows, cols = job.height // (scale * 2), job.width // (scale * 2)
            latents = latents.reshape(latents.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
            bn = pipeline.vae.bn
            bn_mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
            bn_std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipeline.vae.config.batch_norm_eps)
            return pipeline._unpatchify_latents(latents * bn_std.to(latents.device, latents.dtype) + bn_mean)
        if layout in ("packed", "packed-frames"):
            latents = pipeline._unpack_latents(latents, job.height, job.width, scale)
        if layout == "packed-frames":
            latents = latents[:, :, 0]
        config = pipeline.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            return latents * std_t / getattr(config, "scaling_factor", 1.0) + mean_t
        return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
