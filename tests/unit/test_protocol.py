"""Request validation and size resolution against a model's limits."""

from __future__ import annotations

import pytest

from diffuserve.errors import InvalidRequest
from diffuserve.protocol import (
    ASPECT_RATIOS,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    dimensions_for_aspect,
)
from diffuserve.types import ModelInfo

FLUX = ModelInfo(
    name="flux-1-dev-xl-bs4", family="flux-dev", repo="black-forest-labs/FLUX.1-dev", tier="XL",
    default_steps=28, default_guidance=3.5, native_width=1024, native_height=1024, size_multiple=16,
    min_size=256, max_size=2048, max_steps=200, supports_negative_prompt=False, max_batch=4,
)  # fmt: skip


def convert(**body: object):
    return ImageGenerationRequest.parse({"prompt": "p", **body}).to_generation(
        request_id="r", model=FLUX, max_images=10
    )


def test_defaults_come_from_the_model() -> None:
    request = convert(seed=3)
    assert (request.width, request.height, request.steps, request.guidance) == (1024, 1024, 28, 3.5)
    assert request.output_format == "webp"
    assert request.seeds == [3]


def test_n_uses_consecutive_seeds() -> None:
    assert convert(seed=10, n=3).seeds == [10, 11, 12]


@pytest.mark.parametrize("ratio", list(ASPECT_RATIOS))
def test_aspect_ratios_are_near_native_area_and_multiples_of_16(ratio: str) -> None:
    width, height = dimensions_for_aspect(ratio, FLUX)
    w, h = ASPECT_RATIOS[ratio]
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width / height - w / h) / (w / h) < 0.06
    assert 0.85 < width * height / (1024 * 1024) < 1.15


def test_size_string_and_explicit_dimensions() -> None:
    assert (convert(size="1024x768").width, convert(size="1024x768").height) == (1024, 768)
    assert (convert(width=512, height=1024).width, convert(width=512, height=1024).height) == (512, 1024)
    assert convert(size="auto").width == 1024


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"size": "1000x1000"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"width": 1024}, "height"),
        ({"size": "1024x1024", "width": 1024, "height": 1024}, "width/height"),
        ({"num_inference_steps": 201}, "num_inference_steps"),
        ({"negative_prompt": "ugly"}, "negative_prompt"),
        ({"n": 11}, "n"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
    ],
)
def test_rejections_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        convert(**body)
    assert excinfo.value.param == param
    assert excinfo.value.status == 400


def test_size_error_lists_the_allowed_range() -> None:
    with pytest.raises(InvalidRequest, match="multiples of 16 between 256 and 2048"):
        convert(size="7x7")


def test_unknown_fields_are_tolerated() -> None:
    assert convert(some_future_field=1).prompt == "p"


def test_strict_types() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        convert(n="2")
    assert excinfo.value.param == "n"


def test_a_request_over_the_cost_limit_is_refused_naming_what_to_lower() -> None:
    body = ImageGenerationRequest.parse({"prompt": "p", "n": 2, "num_inference_steps": 50})
    # 1024² × 50 steps × 2 images = 104.9 megapixel-steps.
    with pytest.raises(InvalidRequest, match=r"104\.858 megapixel-steps") as refused:
        body.to_generation(request_id="r", model=FLUX, max_images=10, max_cost=100)
    assert refused.value.param == "num_inference_steps"
    assert body.to_generation(request_id="r", model=FLUX, max_images=10, max_cost=105).n == 2
    assert body.to_generation(request_id="r", model=FLUX, max_images=10, max_cost=0).n == 2  # 0: no limit


def test_response_format_url_is_accepted() -> None:
    assert ImageGenerationRequest.parse({"prompt": "p", "response_format": "url"}).response_format == "url"
    assert convert(response_format="url").n == 1


def test_image_data_leaves_the_absent_form_out_of_the_json() -> None:
    answer = ImagesResponse(
        data=[ImageData(url="http://h/v1/images/x/content", seed=1), ImageData(b64_json="AA", seed=2)],
        model="m",
        output_format="png",
        size="32x32",
    ).model_dump()
    assert answer["data"][0] == {"url": "http://h/v1/images/x/content", "seed": 1, "revised_prompt": None}
    assert answer["data"][1] == {"b64_json": "AA", "seed": 2, "revised_prompt": None}


@pytest.mark.parametrize("forms", [{}, {"url": "u", "b64_json": "AA"}])
def test_image_data_holds_exactly_one_form(forms: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of b64_json and url"):
        ImageData(seed=1, **forms)
