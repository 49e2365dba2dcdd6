"""`POST /v1/images/edits`: the form fields (OpenAI's plus the extensions), and the conversion of fields and
decoded pictures into a GenerationRequest carrying its EditInput."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, ValidationError

from diffuserve.errors import InvalidRequest
from diffuserve.protocol.generation import ImageGenerationRequest, _to_invalid_request
from diffuserve.protocol.pictures import fit_mask, fit_picture, open_mask, open_picture, size_for_picture
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
        uploads: Sequence[tuple[str, bytes]],
        mask: bytes | None,
        max_pixels: int,
        max_cost: float = 0.0,
        stop: threading.Event | None = None,
    ) -> GenerationRequest:
        """The edit in the engine's units: output size (the first picture's unless one is named), the pictures
        and mask decoded and fitted to it, and at least one denoising step whatever the strength. `uploads`:
        each picture's field name and bytes. Everything that needs no decoding is checked first, every picture's
        header next, then the pictures are decoded one at a time, each straight to the output size, so a
        request holds at most one picture at its full size. Setting `stop` ends the decoding early
        (DecodeStopped)."""
        task = Task.INPAINT if mask is not None else Task.IMAGE_TO_IMAGE
        if task not in model.edit_tasks:
            raise InvalidRequest(
                f"model {model.name} ({model.family}) has no {task} pipeline",
                param="mask" if mask is not None else "image",
            )
        if not uploads:
            raise InvalidRequest("`image` is required: send 1 to 16 PNG, JPEG or WebP files", param="image")
        if len(uploads) > MAX_EDIT_IMAGES:
            raise InvalidRequest(
                f"at most {MAX_EDIT_IMAGES} images per edit, got {len(uploads)}",
                param=uploads[MAX_EDIT_IMAGES][0],
            )
        self.check_n(max_images)
        if len(uploads) > self.n:
            # Output i starts from picture i mod their number: a picture beyond n would be ignored.
            raise InvalidRequest(
                f"{len(uploads)} images for n={self.n}: each output image is an edit of one picture (output i "
                f"of picture i), so send at most n pictures, or raise n",
                param=uploads[self.n][0],
            )
        strength = self.strength if self.strength is not None else DEFAULT_STRENGTH[task]
        if not model.edit_strength:
            # A conditioning edit (FLUX.1 Kontext, Qwen-Image-Edit) runs every step from noise: no strength.
            strength = 1.0
        steps = self._steps_for(strength, model)
        pictures = [open_picture(data, param, max_pixels, stop) for param, data in uploads]
        first_w, first_h = pictures[0].size
        repaint = open_mask(mask, "mask", max_pixels, stop) if mask is not None else None
        if repaint is not None and repaint.size != (first_w, first_h):
            mask_w, mask_h = repaint.size
            raise InvalidRequest(
                f"the mask is {mask_w}x{mask_h} but the image is {first_w}x{first_h}: they must match",
                param="mask",
            )
        width, height = self.resolve_size(model, default=size_for_picture(first_w, first_h, model))
        generation = self._generation(request_id, model, width, height, steps, max_cost)
        fitted = []
        while pictures:  # each picture's file and pixels are let go once it is fitted
            fitted.append(fit_picture(pictures.pop(0), width, height))
        generation.edit = EditInput(
            images=fitted,
            mask=fit_mask(repaint, width, height) if repaint is not None else None,
            strength=strength,
        )
        return generation

    def _steps_for(self, strength: float, model: ModelInfo) -> int:
        """The steps asked for, raised until the pipelines run at least one: they run int(steps × strength)
        of them (SDXL truncates; FLUX rounds its start up, which is never fewer)."""
        steps = self.num_inference_steps if self.num_inference_steps is not None else model.default_steps
        if strength * model.max_steps < 1:
            raise InvalidRequest(
                f"strength {strength:g} runs no denoising step even at the most steps ({model.max_steps}); "
                f"give at least {1 / model.max_steps:g}",
                param="strength",
            )
        needed = max(steps, math.ceil(1 / strength))
        while int(needed * strength) < 1:
            needed += 1
        if needed > model.max_steps:
            raise InvalidRequest(
                f"strength {strength:g} needs {needed} steps to run one, more than {model.max_steps}: raise strength",
                param="strength",
            )
        return needed
