"""Edit requests: uploaded pictures and masks decoded under limits, the output size, steps for a strength,
the split of a request's pictures across its parts, and usage."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from diffuserve.errors import InvalidRequest
from diffuserve.protocol.edits import ImageEditRequest
from diffuserve.protocol.pictures import decode_data_url, decode_mask, decode_picture, size_for_picture
from diffuserve.protocol.usage import usage_for
from diffuserve.types import ModelInfo, Task

FLUX = ModelInfo(
    name="flux", family="flux-dev", repo="r", tier="L", default_steps=28, default_guidance=3.5,
    native_width=1024, native_height=1024, size_multiple=16, min_size=256, max_size=2048, max_steps=200,
    supports_negative_prompt=False, max_batch=4, token_pixels=16,
    edit_tasks=(Task.IMAGE_TO_IMAGE, Task.INPAINT),
)  # fmt: skip
LIMIT = 4096 * 4096


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def picture(width: int = 300, height: int = 200, fmt: str = "PNG") -> bytes:
    return encoded(Image.new("RGB", (width, height), (10, 200, 30)), fmt)


def test_pictures_decode_in_each_accepted_format() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        decoded = decode_picture(picture(fmt=fmt), "image", LIMIT)
        assert decoded.size == (300, 200) and decoded.image.mode == "RGB"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, not an image", "not a PNG, JPEG or WebP"),
        (picture(fmt="GIF"), "not a PNG, JPEG or WebP"),
        (picture()[:60], "could not"),
        (b"", "empty"),
    ],
)
def test_what_is_not_a_whole_picture_is_a_400_naming_the_field(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        decode_picture(data, "image[2]", LIMIT)
    assert caught.value.param == "image[2]"


def test_too_many_pixels_are_refused_from_the_header() -> None:
    with pytest.raises(InvalidRequest, match="more than the 1000 pixels") as caught:
        decode_picture(picture(100, 100), "image", 1000)
    assert caught.value.param == "image"


def test_a_mask_is_its_transparent_pixels_and_needs_alpha() -> None:
    alpha = np.full((4, 6), 255, np.uint8)
    alpha[:, :2] = 0
    rgba = Image.fromarray(np.dstack([np.zeros((4, 6, 3), np.uint8), alpha]), "RGBA")
    mask = decode_mask(encoded(rgba), "mask", LIMIT)
    assert mask.shape == (4, 6) and (mask[:, :2] == 255).all() and (mask[:, 2:] == 0).all()
    with pytest.raises(InvalidRequest, match="no alpha channel"):
        decode_mask(picture(), "mask", LIMIT)


def test_data_urls() -> None:
    assert decode_data_url("data:image/png;base64,aGk=", "images[0].image_url") == b"hi"
    for bad in ("https://example.com/a.png", "data:image/png,raw", "data:image/png;base64,%%%", 5):
        with pytest.raises(InvalidRequest) as caught:
            decode_data_url(bad, "images[0].image_url")
        assert caught.value.param == "images[0].image_url"


def test_the_output_size_follows_the_first_picture_within_limits() -> None:
    assert size_for_picture(1000, 750, FLUX) == (992, 752)  # 62.5 steps of 16 round to even
    assert size_for_picture(4000, 3000, FLUX) == (2048, 1536)
    assert size_for_picture(100, 100, FLUX) == (256, 256)


def mask_png(width: int, height: int) -> bytes:
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = 255
    return encoded(Image.fromarray(rgba, "RGBA"))


def edit(mask: bytes | None = None, pictures: int = 1, model: ModelInfo = FLUX, **fields: object):
    body = ImageEditRequest.parse_form({"prompt": "p", **{k: str(v) for k, v in fields.items()}})
    uploads = [(f"image[{i}]", picture(640, 480)) for i in range(pictures)]
    return body.to_edit(
        request_id="r", model=model, max_images=10, uploads=uploads, mask=mask, max_pixels=LIMIT
    )


def test_an_edit_is_sized_from_its_picture_and_fitted() -> None:
    request = edit(seed=1)
    assert (request.width, request.height) == (640, 480)
    assert request.edit is not None and request.edit.task is Task.IMAGE_TO_IMAGE
    assert request.edit.images[0].shape == (480, 640, 3) and request.edit.strength == 0.6
    sized = edit(size="512x512")
    assert sized.edit is not None and sized.edit.images[0].shape == (512, 512, 3)


def test_form_values_arrive_as_text_and_are_read_as_numbers() -> None:
    request = edit(strength="0.25", num_inference_steps="8", n="2", stream="true", partial_images="2")
    assert request.edit is not None and request.edit.strength == 0.25
    assert (request.steps, request.n, request.partial_images) == (8, 2, 2)


def test_at_least_one_step_runs_whatever_the_strength() -> None:
    assert edit(strength=0.05, num_inference_steps=4).steps == 20


def test_a_mask_makes_it_inpainting_and_must_match_the_first_picture() -> None:
    request = edit(mask=mask_png(640, 480))
    assert request.edit is not None and request.edit.task is Task.INPAINT and request.edit.strength == 1.0
    with pytest.raises(InvalidRequest, match="must match") as caught:
        edit(mask=mask_png(64, 48))
    assert caught.value.param == "mask"


def test_a_model_without_edit_pipelines_refuses() -> None:
    with pytest.raises(InvalidRequest, match="no image-to-image pipeline"):
        edit(model=replace(FLUX, edit_tasks=()))


def test_more_pictures_than_outputs_are_refused_before_decoding() -> None:
    body = ImageEditRequest.parse_form({"prompt": "p", "n": "2"})
    uploads = [("image[0]", picture()), ("image[1]", b"never decoded"), ("image[2]", b"never decoded")]
    with pytest.raises(InvalidRequest, match="3 images for n=2") as caught:
        body.to_edit(request_id="r", model=FLUX, max_images=10, uploads=uploads, mask=None, max_pixels=LIMIT)
    assert caught.value.param == "image[2]"


@pytest.mark.parametrize("strength", ["1e-320", "0.001"])
def test_a_strength_too_small_for_any_step_is_a_400_naming_it(strength: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        edit(strength=strength)
    assert caught.value.param == "strength"


def test_steps_are_raised_until_one_runs_as_sdxl_counts_them() -> None:
    # SDXL runs int(steps × strength) steps: 3 × 0.3333333333 is just under one.
    request = edit(strength="0.3333333333", num_inference_steps=3)
    assert int(request.steps * 0.3333333333) >= 1


def test_a_split_request_keeps_each_output_on_its_picture() -> None:
    request = edit(pictures=3, n=5, seed=0)
    assert request.edit is not None
    sources = [id(p) for p in request.edit.images]
    parts = request.split(2)
    assert [part.n for part in parts] == [2, 2, 1]
    items = [part.to_item() for part in parts]
    used = [id(image) for item in items for image in item.init_images or []]
    assert used == [sources[i % 3] for i in range(5)]


def test_usage_counts_text_input_pictures_and_outputs() -> None:
    request = edit(pictures=2, n=3, size="512x256")
    usage = usage_for(request, FLUX, text_tokens=7)
    per_image = (512 // 16) * (256 // 16)
    assert usage.input_tokens_details.image_tokens == 2 * per_image
    assert usage.output_tokens == 3 * per_image
    assert usage.input_tokens == 7 + 2 * per_image
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
