"""The `usage` object of OpenAI's image responses, counted for real: the prompt's text tokens as the model's
text encoder reads them, and image tokens as the denoiser's positions (one per token_pixels² pixels)."""

from __future__ import annotations

from pydantic import BaseModel

from diffuserve.types import GenerationRequest, ModelInfo


class TokenDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    output_tokens_details: TokenDetails
    total_tokens: int


def usage_for(
    request: GenerationRequest,
    model: ModelInfo,
    text_tokens: int,
    *,
    images: int | None = None,
    pictures: int | None = None,
) -> Usage:
    """A request's usage: its prompt's `text_tokens`, `pictures` input pictures (an edit's, by default) and
    `images` outputs (all the request's, by default), both in image tokens at the output size."""
    per_image = model.image_tokens(request.width, request.height)
    if pictures is None:
        pictures = len(request.edit.images) if request.edit is not None else 0
    output = per_image * (request.n if images is None else images)
    inputs = text_tokens + pictures * per_image
    return Usage(
        input_tokens=inputs,
        input_tokens_details=TokenDetails(text_tokens=text_tokens, image_tokens=pictures * per_image),
        output_tokens=output,
        output_tokens_details=TokenDetails(text_tokens=0, image_tokens=output),
        total_tokens=inputs + output,
    )
