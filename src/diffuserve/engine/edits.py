"""Edits on the loaded model: diffusers' image-to-image and inpainting pipelines made from it (`from_pipe`, so
they share its weights, tier and hooks), their inputs, and the inpainting paste-back."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from diffuserve.types import BatchJob, Family, Task

log = logging.getLogger(__name__)


def _made_from(pipeline: Any, class_name: str) -> Any:
    """The loaded pipeline where it is of `class_name`, else that pipeline made from its components (sharing
    weights). Not `from_pipe`: given no dtype, diffusers 0.42's casts every shared module to float32, which
    doubled Qwen-Image-Edit's 54 GB on an 80 GB H100 (out of memory at load)."""
    import inspect

    import diffusers

    if type(pipeline).__name__ == class_name:
        made = pipeline
    else:
        made_class = getattr(diffusers, class_name)
        takes = set(inspect.signature(made_class.__init__).parameters)
        made = made_class(**{name: part for name, part in pipeline.components.items() if name in takes})
    made.set_progress_bar_config(disable=True)
    return made


def text_pipeline(pipeline: Any, family: Family) -> Any:
    """What serves text-to-image: the loaded pipeline, or for an edit-only class (Qwen-Image-Edit) the family's
    text-to-image class made from it."""
    return _made_from(pipeline, family.text_pipeline) if family.text_pipeline else pipeline


# The edit classes diffusers' auto pipelines map a class to, where they take exactly the components of the
# class and no other config: made directly, without importing the auto pipelines' module, which imports every
# family's pipelines (half a second of a CPU server's start).
DIRECT_EDITS = {
    "FluxPipeline": {Task.IMAGE_TO_IMAGE: "FluxImg2ImgPipeline", Task.INPAINT: "FluxInpaintPipeline"}
}


def edit_pipelines(pipeline: Any, family: Family | None = None) -> dict[Task, Any]:
    """The edit pipelines of this family: its own (FLUX.1 Kontext, Qwen-Image-Edit: image-to-image with the
    picture as a condition), or those diffusers maps the class to (FLUX, SDXL and the built-in models have
    both); a family without one serves no such edits, and the API refuses them."""
    edit = family.edit if family is not None else "auto"
    if edit is None:
        return {}
    if edit != "auto":
        return {Task.IMAGE_TO_IMAGE: _made_from(pipeline, edit)}
    direct = DIRECT_EDITS.get(type(pipeline).__name__)
    if direct is not None:
        return {task: _made_from(pipeline, name) for task, name in direct.items()}
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    found: dict[Task, Any] = {}
    for task, auto in (
        (Task.IMAGE_TO_IMAGE, AutoPipelineForImage2Image),
        (Task.INPAINT, AutoPipelineForInpainting),
    ):
        try:
            edit = auto.from_pipe(pipeline)
        except (ValueError, KeyError, TypeError) as exc:  # diffusers has no such pipeline for this model
            log.info("no %s pipeline for %s: %s", task, type(pipeline).__name__, exc)
            continue
        edit.set_progress_bar_config(disable=True)
        found[task] = edit
    return found


def edit_kwargs(job: BatchJob, accepted: set[str] | None = None) -> dict[str, Any]:
    """The pictures, masks and strength of an edit job, as diffusers' edit pipelines take them (those of them
    the pipeline's `__call__` takes: a conditioning edit such as Kontext's has no strength)."""
    from PIL import Image

    if job.task is Task.GENERATE:
        return {}
    kwargs: dict[str, Any] = {
        "image": [
            Image.fromarray(picture, "RGB") for item in job.items for picture in item.init_images or []
        ],
        "strength": job.strength,
    }
    if job.task is Task.INPAINT:
        masks = [item.mask for item in job.items for _ in item.seeds]
        kwargs["mask_image"] = [Image.fromarray(mask, "L") for mask in masks if mask is not None]
    return {k: v for k, v in kwargs.items() if accepted is None or k in accepted}


def keep_outside_mask(images: Any, job: BatchJob, rows: list[int] | None = None) -> Any:
    """Inpainting: the source picture's own pixels wherever the mask keeps them. The model repaints in latent
    space, whose round trip through the VAE (and a mask at latent resolution) would otherwise change the kept
    part a little. `images`: N×3×H×W in [0, 1] on the device, the job's images or its `rows`."""
    import torch

    if job.task is not Task.INPAINT:
        return images
    pictures = [picture for item in job.items for picture in item.init_images or []]
    masks = [item.mask for item in job.items for _ in item.seeds if item.mask is not None]
    if rows is not None:
        pictures, masks = [pictures[i] for i in rows], [masks[i] for i in rows]
    source = torch.from_numpy(np.stack(pictures)).to(images.device).permute(0, 3, 1, 2)
    repaint = torch.from_numpy(np.stack(masks) >= 128).to(images.device)[:, None]
    return torch.where(repaint, images, source.to(images.dtype) / 255)
