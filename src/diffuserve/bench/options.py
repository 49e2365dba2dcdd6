"""What each benchmark user sends and how it judges the answer; options read from and written to BENCH_* env vars."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import PrivateAttr, field_validator, model_validator

from diffuserve.envsettings import EnvSettings, setting

GENERATIONS_PATH = "/v1/images/generations"
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
ResponseFormat = Literal["bytes", "b64_json"]

_SIZE = re.compile(r"^(\d+)x(\d+)$")
_ASPECT = re.compile(r"^(\d+):(\d+)$")


class OptionError(ValueError):
    """A benchmark option has a value the command cannot use; the message names the flag."""


def parse_users(raw: str) -> list[int]:
    """`1,2,4` → [1, 2, 4]; each count positive and given once."""
    try:
        users = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"--users must be comma-separated integers like 1,2,4,8, got {raw!r}") from None
    if not users:
        raise OptionError("--users needs at least one user count")
    if any(u < 1 for u in users):
        raise OptionError(f"--users counts must be >= 1, got {raw!r}")
    if len(set(users)) != len(users):
        raise OptionError(f"--users lists a count twice: {raw!r}")
    return users


def parse_size(raw: str) -> tuple[int, int]:
    """`512x768` → (512, 768)."""
    match = _SIZE.match(raw.strip().lower())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise OptionError(f"--size must look like WIDTHxHEIGHT (e.g. 1024x1024), got {raw!r}")
    return int(match[1]), int(match[2])


def parse_aspect_ratio(raw: str) -> str:
    match = _ASPECT.match(raw.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise OptionError(f"--aspect-ratio must look like W:H (e.g. 16:9), got {raw!r}")
    return f"{int(match[1])}:{int(match[2])}"


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line; users pick one at random for each request."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise OptionError(f"--prompt-file {path!r} cannot be read: {exc.strerror or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise OptionError(f"--prompt-file {path!r} holds no prompt (one prompt per line)")
    return prompts


class LoadOptions(EnvSettings):
    """Everything one simulated user needs. `None` leaves the choice to the server's model defaults.

    Each option has a BENCH_* env var: the locust file reads them, so `locust -f` and `diffuserve bench` share
    one path; `to_env` writes them for the locust step.
    """

    error_class: ClassVar[type[ValueError]] = OptionError

    url: str = setting("", "BENCH_URL", help="server base URL, e.g. http://127.0.0.1:8000")
    api_key: str | None = setting(None, "API_KEY", help="bearer token", repr=False)
    model: str | None = setting(None, "BENCH_MODEL", help="model id, sent as `model` and X-Model-Name")
    prompt: str = setting(DEFAULT_PROMPT, "BENCH_PROMPT", help="prompt of every request")
    prompt_file: str | None = setting(
        None, "BENCH_PROMPT_FILE", help="file with one prompt per line, picked at random"
    )
    size: str | None = setting(None, "BENCH_SIZE", help="WIDTHxHEIGHT, e.g. 1024x1024")
    aspect_ratio: str | None = setting(None, "BENCH_ASPECT_RATIO", help="W:H, e.g. 16:9")
    steps: int | None = setting(None, "BENCH_STEPS", help="num_inference_steps", ge=1)
    guidance: float | None = setting(None, "BENCH_GUIDANCE", help="guidance_scale", ge=0)
    # None: a fresh random seed per request.
    seed: int | None = setting(None, "BENCH_SEED", help="one seed for every request")
    n: int = setting(1, "BENCH_N", help="images per request", ge=1)
    response_format: ResponseFormat = setting(
        "bytes",
        "BENCH_RESPONSE_FORMAT",
        help="bytes: image as the body; b64_json: OpenAI JSON",
    )
    # None: run until stopped.
    iterations: int | None = setting(None, "BENCH_ITERATIONS", help="requests in all, across users", ge=1)
    timeout: float = setting(600.0, "BENCH_TIMEOUT", help="seconds one request may take", gt=0)
    _prompts: list[str] = PrivateAttr(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return normalize_base_url(value) if value else ""

    @field_validator("prompt_file")
    @classmethod
    def _prompt_file(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if not value:
            return None
        w, h = parse_size(value)
        return f"{w}x{h}"

    @field_validator("aspect_ratio")
    @classmethod
    def _aspect_ratio(cls, value: str | None) -> str | None:
        return parse_aspect_ratio(value) if value else None

    @model_validator(mode="after")
    def _together(self) -> LoadOptions:
        if self.size and self.aspect_ratio:
            raise OptionError("give --size or --aspect-ratio, not both")
        if self.n > 1 and self.response_format != "b64_json":
            # A body holds one image: the server refuses n > 1 as raw bytes, so every request would fail.
            raise OptionError(
                f"--n {self.n} needs --response-format b64_json: several images per request come only as JSON"
            )
        if not self.prompt.strip() and not self.prompt_file:
            raise OptionError("--prompt is empty")
        self._prompts = read_prompt_file(self.prompt_file) if self.prompt_file else [self.prompt]
        return self

    @property
    def prompts(self) -> list[str]:
        return self._prompts

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        # The server answers JSON to clients that ask for it; curl's `*/*` gets the image bytes.
        headers["Accept"] = "application/json" if self.response_format == "b64_json" else "*/*"
        if self.model:
            headers["X-Model-Name"] = self.model
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def payload(self, rng: random.Random) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": rng.choice(self.prompts), "n": self.n}
        body["seed"] = self.seed if self.seed is not None else rng.randrange(2**31)
        if self.model:
            body["model"] = self.model
        if self.size:
            body["size"] = self.size
        if self.aspect_ratio:
            body["aspect_ratio"] = self.aspect_ratio
        if self.steps is not None:
            body["num_inference_steps"] = self.steps
        if self.guidance is not None:
            body["guidance_scale"] = self.guidance
        if self.response_format == "b64_json":
            body["response_format"] = "b64_json"
        return body

    def describe(self) -> dict[str, Any]:
        """The options as recorded in summary.json (never the API key)."""
        return {
            "model": self.model,
            "prompts": len(self.prompts),
            "prompt": self.prompts[0] if len(self.prompts) == 1 else None,
            "prompt_file": self.prompt_file,
            "size": self.size,
            "aspect_ratio": self.aspect_ratio,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed if self.seed is not None else "random",
            "n": self.n,
            "response_format": self.response_format,
            "auth": bool(self.api_key),
        }


def response_problem(status: int, headers: Any, body: bytes | None, n: int) -> str | None:
    """Why a response is not a successful generation, or None when it is."""
    if status != 200:
        message = ""
        try:
            message = json.loads(body or b"")["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = (body or b"")[:200].decode("utf-8", "replace")
        return f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if not body:
        return "HTTP 200 with an empty body"
    content_type = (headers.get("content-type") or "") if headers is not None else ""
    if content_type.startswith("application/json"):
        try:
            data = json.loads(body)["data"]
        except (ValueError, KeyError, TypeError):
            return "HTTP 200 JSON without a `data` list"
        if len(data) != n or not all(item.get("b64_json") for item in data):
            return f"expected {n} b64_json image(s), got {len(data)}"
    return None


def normalize_base_url(url: str) -> str:
    """`http://h:8000/v1/` → `http://h:8000`: the API paths are added by whoever sends the request."""
    url = url.strip()
    if not re.match(r"^https?://[^/\s]+", url):
        raise OptionError(f"URL must start with http:// or https:// and name a host, got {url!r}")
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url
