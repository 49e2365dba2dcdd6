"""The OpenAI Images generation request (plus diffuserve's extensions), its conversion to a GenerationRequest, and the
response bodies."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from diffuserve.errors import InvalidRequest
from diffuserve.logs import safe_text
from diffuserve.protocol.usage import Usage
from diffuserve.types import GenerationRequest, ModelInfo, Priority

log = logging.getLogger("diffuserve.protocol")

MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0
MAX_PARTIAL_IMAGES = 3
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_OUTPUT_FORMAT = "webp"
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1), "16:9": (16, 9), "9:16": (9, 16), "4:3": (4, 3), "3:4": (3, 4),
    "3:2": (3, 2), "2:3": (2, 3), "21:9": (21, 9), "9:21": (9, 21),
}  # fmt: skip
SIZE_PATTERN = re.compile(r"^(\d{1,6})x(\d{1,6})$")
# No field takes an integer above 2**63 (19 digits); longer ones are refused by the field's own validation
# instead of by Python's int-from-str limit (4,300 digits), which would fail the whole body without a name.
MAX_INTEGER_DIGITS = 40
# Unknown fields are logged, but a body of a million field names must not write a megabyte of log.
LOGGED_UNKNOWN_FIELDS = 10
LOGGED_FIELD_CHARS = 64


class OversizedInteger:
    """Stands for a JSON integer too long to be any field's value: no field's type accepts it (not even a
    string field: it is deliberately not a str), so the field's validation names it."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | OversizedInteger:
    return OversizedInteger(text) if len(text.lstrip("-")) > MAX_INTEGER_DIGITS else int(text)


def decode_json(raw: bytes) -> Any:
    """A request body as JSON; malformed text, bad UTF-8 and nesting deeper than the parser allows are 400."""
    try:
        return json.loads(raw, parse_int=_parse_int)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidRequest(f"the request body is not valid JSON: {safe_text(str(exc))}") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply to be a valid request") from None


MAX_LORAS = 4
MAX_LORA_SCALE = 4.0


class LoraRequest(BaseModel):
    """One adapter of a request's `loras`: a name (LORA_DIR's, or one read at start), an optional file in a
    folder, and its strength (1 = as trained, 0 = off, negative = away from it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)
    weight_name: str | None = Field(default=None, min_length=1, max_length=200)


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations` body. Strict types: "4" is not a number. Unknown fields are logged."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    user: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=MAX_PARTIAL_IMAGES)
    # OpenAI fields with no meaning for these models; accepted (and echoed) so standard clients work.
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = None
    # These models paint opaque pictures: "transparent" is refused rather than ignored.
    background: Literal["opaque", "auto"] | None = None
    moderation: str | None = None
    # diffuserve extensions
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    aspect_ratio: str | None = None
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    num_inference_steps: int | None = Field(default=None, ge=1)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    loras: list[LoraRequest] | None = Field(default=None, max_length=MAX_LORAS)
    priority: Literal["interactive", "default", "batch"] | None = None
    # With `stream`: queue position and denoising steps as `progress` events beside the partial images.
    progress: bool | None = None

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_text(cls, value: Any) -> Any:
        """A multipart form sends `loras` as JSON text; a JSON body may too."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except (ValueError, RecursionError):  # RecursionError: "[[[[…" deeper than the parser goes
                raise ValueError("must be a JSON list of {name, scale, weight_name} objects") from None
        return value

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, value: list[LoraRequest] | None) -> list[LoraRequest] | None:
        seen = [(lora.name, lora.weight_name) for lora in value or []]
        if len(set(seen)) != len(seen):
            raise ValueError("an adapter is named twice; give each once, with the scale you want")
        return value

    @property
    def adapters(self) -> list[tuple[str, str | None, float]]:
        """The adapters asked for: name, file in its folder (or None), scale."""
        return [(lora.name, lora.weight_name, lora.scale) for lora in self.loras or []]

    @classmethod
    def parse(cls, payload: Any) -> ImageGenerationRequest:
        """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
        if not isinstance(payload, dict):
            raise InvalidRequest("the request body must be a JSON object")
        try:
            parsed = cls.model_validate(payload)
        except ValidationError as exc:
            raise _to_invalid_request(exc) from None
        if parsed.model_extra:
            names = list(parsed.model_extra)
            log.info("ignoring %d unknown request field(s): %s", len(names), describe_unknown_fields(names))
        return parsed

    def to_generation(
        self, *, request_id: str, model: ModelInfo, max_images: int, max_cost: float = 0.0
    ) -> GenerationRequest:
        """Resolve defaults and model limits into the engine's units; every rejection names its field.
        `max_cost`: the most megapixel-steps (width × height × steps × n / 10⁶) one request may ask for; 0 = any."""
        self.check_n(max_images)
        width, height = self.resolve_size(model)
        steps = self.num_inference_steps if self.num_inference_steps is not None else model.default_steps
        return self._generation(request_id, model, width, height, steps, max_cost)

    def check_n(self, max_images: int) -> None:
        if self.n > max_images:
            raise InvalidRequest(f"n must be between 1 and {max_images}, got {self.n}", param="n")

    def _generation(
        self, request_id: str, model: ModelInfo, width: int, height: int, steps: int, max_cost: float
    ) -> GenerationRequest:
        if self.stream and self.response_format == "url":
            raise InvalidRequest(
                "a stream carries its images in its events (b64_json), as OpenAI's do: omit response_format "
                "'url' or `stream`",
                param="response_format",
            )
        if steps > model.max_steps:
            raise InvalidRequest(
                f"num_inference_steps must be between 1 and {model.max_steps}, got {steps}",
                param="num_inference_steps",
            )
        cost = width * height * steps * self.n / 1e6
        if max_cost and cost > max_cost:
            raise InvalidRequest(
                f"this request costs {cost:g} megapixel-steps ({width}x{height} × {steps} steps × n={self.n}); "
                f"this server takes at most {max_cost:g}: lower num_inference_steps, the size or n",
                param="num_inference_steps",
            )
        negative = self.negative_prompt or None
        if negative and not model.supports_negative_prompt:
            raise InvalidRequest(
                f"model {model.name} ({model.family}) does not support negative_prompt",
                param="negative_prompt",
            )
        return GenerationRequest(
            request_id=request_id,
            model=model.name,
            prompt=self.prompt,
            n=self.n,
            width=width,
            height=height,
            steps=steps,
            guidance=float(
                self.guidance_scale if self.guidance_scale is not None else model.default_guidance
            ),
            seed=self.seed if self.seed is not None else secrets.randbelow(2**32),
            output_format=self.output_format or DEFAULT_OUTPUT_FORMAT,
            output_compression=self.output_compression,
            negative_prompt=negative,
            partial_images=(self.partial_images or 0) if self.stream else 0,
            priority=Priority(self.priority or "default"),
            report_progress=bool(self.stream and self.progress),
        )

    def resolve_size(self, model: ModelInfo, default: tuple[int, int] | None = None) -> tuple[int, int]:
        """One of: width+height, size "WxH", aspect_ratio, or `default` (the model's native size unless given);
        never two at once."""
        size = None if self.size in (None, "auto") else self.size
        given = [name for name, value in (("size", size), ("aspect_ratio", self.aspect_ratio)) if value]
        if self.width is not None or self.height is not None:
            given.append("width/height")
        if len(given) > 1:
            raise InvalidRequest(
                f"give only one of size, aspect_ratio or width/height (got {', '.join(given)})",
                param=given[1],
            )
        if self.width is not None or self.height is not None:
            if self.width is None or self.height is None:
                missing = "height" if self.height is None else "width"
                raise InvalidRequest("width and height must be given together", param=missing)
            return _check_split(*_check_dimensions(self.width, self.height, model, "width"), model, "width")
        if size is not None:
            match = SIZE_PATTERN.match(size)
            if not match:
                raise InvalidRequest(
                    f"size must be 'auto' or 'WIDTHxHEIGHT' like '1024x1024', got {size!r}", param="size"
                )
            width, height = _check_dimensions(int(match.group(1)), int(match.group(2)), model, "size")
            return _check_split(width, height, model, "size")
        if self.aspect_ratio is not None:
            if self.aspect_ratio not in ASPECT_RATIOS:
                raise InvalidRequest(
                    f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, got {self.aspect_ratio!r}",
                    param="aspect_ratio",
                )
            return dimensions_for_aspect(self.aspect_ratio, model)
        return default or (model.native_width, model.native_height)


def dimensions_for_aspect(aspect_ratio: str, model: ModelInfo) -> tuple[int, int]:
    """Dimensions with the ratio, near the model's native area, multiples of its size step, within limits."""
    ratio_w, ratio_h = ASPECT_RATIOS[aspect_ratio]
    area = model.native_width * model.native_height
    return snap_size(math.sqrt(area * ratio_w / ratio_h), math.sqrt(area * ratio_h / ratio_w), model)


def snap_size(width: float, height: float, model: ModelInfo) -> tuple[int, int]:
    """The nearest size the model serves: multiples of its size step, within its limits, and a token count a
    worker group's devices share evenly."""

    def snap(value: float, step: int) -> int:
        return int(min(model.max_size, max(model.min_size, round(value / step) * step)))

    step = model.size_multiple
    out_w, out_h = snap(width, step), snap(height, step)
    if not model.splits(out_w, out_h):
        # A worker group needs a token count its devices share evenly: a width in whole tokens per device.
        out_w = snap(width, math.lcm(step, model.token_pixels * model.parallel))
    return out_w, out_h


def _check_dimensions(width: int, height: int, model: ModelInfo, param: str) -> tuple[int, int]:
    step, low, high = model.size_multiple, model.min_size, model.max_size
    if not (low <= width <= high and low <= height <= high) or width % step or height % step:
        raise InvalidRequest(
            f"{width}x{height} is not a valid size for {model.name}: width and height must be multiples of "
            f"{step} between {low} and {high} (native {model.native_width}x{model.native_height})",
            param=param,
        )
    return width, height


def describe_unknown_fields(names: list[str]) -> str:
    """The first LOGGED_UNKNOWN_FIELDS names in sorted order, each escaped and cut to LOGGED_FIELD_CHARS."""
    shown = [safe_text(name, LOGGED_FIELD_CHARS) for name in sorted(names)[:LOGGED_UNKNOWN_FIELDS]]
    return ", ".join(shown) + (", …" if len(names) > len(shown) else "")


def _check_split(width: int, height: int, model: ModelInfo, param: str) -> tuple[int, int]:
    """A worker group splits an image's tokens across its devices: the count must divide by their number."""
    if not model.splits(width, height):
        tokens = (width // model.token_pixels) * (height // model.token_pixels)
        multiple = math.lcm(model.size_multiple, model.token_pixels * model.parallel)
        raise InvalidRequest(
            f"{width}x{height} is not served by {model.name}: its {tokens} image tokens do not split evenly "
            f"across the {model.parallel} devices of a worker group; make the width or the height a multiple "
            f"of {multiple}",
            param=param,
        )
    return width, height


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    # Only the model's own field names reach here (unknown fields are allowed), but the path may hold
    # a client's list index or dict key: keep it short and printable.
    field = safe_text(".".join(str(part) for part in error["loc"]), LOGGED_FIELD_CHARS) or None
    message = error["msg"]
    if isinstance(error.get("input"), OversizedInteger):
        message = f"invalid `{field}`: an integer of {error['input'].digits} digits is out of range"
    elif error["type"] == "missing":
        message = f"`{field}` is required"
    elif error["type"] == "literal_error":
        message = f"invalid value for `{field}`: {message}"
    else:
        message = f"invalid `{field}`: {message}"
    return InvalidRequest(message, param=field)


class ImageData(BaseModel):
    """One image of an answer: `b64_json` or `url`, as response_format asked; the other is left out of the
    JSON, as in OpenAI's answers."""

    b64_json: str | None = None
    url: str | None = None
    seed: int
    revised_prompt: str | None = None

    @model_validator(mode="after")
    def _one_image_form(self) -> ImageData:
        if (self.b64_json is None) == (self.url is None):
            raise ValueError("an image has exactly one of b64_json and url")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent_form(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("b64_json", "url"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ImagesResponse(BaseModel):
    created: int = Field(default_factory=lambda: int(time.time()))
    data: list[ImageData]
    model: str
    output_format: str
    size: str
    quality: str = "auto"
    background: str = "opaque"
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffuserve"
    root: str | None = None
    # Extensions for clients that build a form (the playground); null until a worker has loaded the model.
    family: str | None = None
    supports_negative_prompt: bool | None = None
    default_size: str | None = None
    default_steps: int | None = None
    default_guidance: float | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
