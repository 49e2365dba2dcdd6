"""`POST /v1/images/edits`: the form fields (OpenAI's plus the extensions), and the conversion of fields and
decoded pictures into a GenerationRequest carrying its EditInput."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from diffuserve.errors import InvalidRequest
from diffuserve.protocol.generation import ImageGenerationRequest, _to_invalid_request
from diffuserve.protocol.pictures import Picture, fit_mask, fit_picture, size_for_picture
from diffuserve.types import EditInput, GenerationRequest, ModelInfo, Task

MAX_EDIT_IMAGES = 16
# How far the pictures are noised before the model repaints them (diffusers' FLUX image-to-image default);
# inpainting repaints the masked part from scratch.
DEFAULT_STRENGTH = {Task.IMAGE_TO_IMAGE: 0.6, Task.INPAINT: 1.0}


class ImageEditRequest(ImageGenerationRequest):
    """The fields of an edit besides its pictures. From a multipart form every value arrives as text, so a
    form is validated in lax mode ("0.9" is a number there); a JSON body keeps strict types."""

    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    input_fidelity: Literal["high", "low"] | None = None

    @classmethod
    def parse_form(cls, fields: dict[str, Any]) -> ImageEditRequest:
        try:
            parsed = cls.model_validate(fields, strict=False)
        except ValidationError as exc:
            raise _to_invalid_request(exc) from None
        return parsed

    def to_edit(
        self,
        *,
        request_id: str,
        model: ModelInfo,
        max_images: int,
        pictures: list[Picture],
        mask: np.ndarray | None,
        max_cost: float = 0.0,
    ) -> GenerationRequest:
        """The edit in the engine's units: output size (the first picture's unless one is named), the pictures
        and mask fitted to it, and at least one denoising step whatever the strength."""
        task = Task.INPAINT if mask is not None else Task.IMAGE_TO_IMAGE
        if task not in model.edit_tasks:
            raise InvalidRequest(
                f"model {model.name} ({model.family}) has no {task} pipeline",
                param="mask" if mask is not None else "image",
            )
        if not pictures:
            raise InvalidRequest("`image` is required: send 1 to 16 PNG, JPEG or WebP files", param="image")
        if len(pictures) > MAX_EDIT_IMAGES:
            raise InvalidRequest(
                f"at most {MAX_EDIT_IMAGES} images per edit, got {len(pictures)}",
                param=pictures[MAX_EDIT_IMAGES].param,
            )
        first_w, first_h = pictures[0].size
        if mask is not None and mask.shape != (first_h, first_w):
            raise InvalidRequest(
                f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is {first_w}x{first_h}: they must match",
                param="mask",
            )
        if self.n > max_images:
            raise InvalidRequest(f"n must be between 1 and {max_images}, got {self.n}", param="n")
        width, height = self.resolve_size(model, default=size_for_picture(first_w, first_h, model))
        strength = self.strength if self.strength is not None else DEFAULT_STRENGTH[task]
        steps = self.num_inference_steps if self.num_inference_steps is not None else model.default_steps
        # The pipelines run about steps × strength of the schedule's steps: never none.
        steps = max(steps, math.ceil(1 / strength - 1e-9))
        generation = self._generation(request_id, model, width, height, steps, max_cost)
        generation.edit = EditInput(
            images=[fit_picture(picture, width, height) for picture in pictures],
            mask=fit_mask(mask, width, height) if mask is not None else None,
            strength=strength,
        )
        return generation
