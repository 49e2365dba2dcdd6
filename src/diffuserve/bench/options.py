"""What each benchmark user sends and how it judges the answer; options read from and written to BENCH_* env vars."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENERATIONS_PATH = "/v1/images/generations"
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
RESPONSE_FORMATS = ("bytes", "b64_json")

# One env var per option: the locust file reads these, so `locust -f` and `diffuserve bench` share one path.
ENV = {
    "url": "BENCH_URL",
    "api_key": "API_KEY",
    "model": "BENCH_MODEL",
    "prompt": "BENCH_PROMPT",
    "prompt_file": "BENCH_PROMPT_FILE",
    "size": "BENCH_SIZE",
    "aspect_ratio": "BENCH_ASPECT_RATIO",
    "steps": "BENCH_STEPS",
    "guidance": "BENCH_GUIDANCE",
    "seed": "BENCH_SEED",
    "n": "BENCH_N",
    "response_format": "BENCH_RESPONSE_FORMAT",
    "iterations": "BENCH_ITERATIONS",
    "timeout": "BENCH_TIMEOUT",
}

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


@dataclass
class LoadOptions:
    """Everything one simulated user needs. `None` leaves the choice to the server's model defaults."""

    url: str = ""
    api_key: str | None = None
    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    prompt_file: str | None = None
    size: str | None = None
    aspect_ratio: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None: a fresh random seed per request
    n: int = 1
    response_format: str = "bytes"  # bytes: the image as the body; b64_json: OpenAI JSON
    iterations: int | None = None  # requests in all, across users; None: run until stopped
    timeout: float = 600.0
    prompts: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.url = normalize_base_url(self.url) if self.url else ""
        if self.size and self.aspect_ratio:
            raise OptionError("give --size or --aspect-ratio, not both")
        if self.size:
            w, h = parse_size(self.size)
            self.size = f"{w}x{h}"
        if self.aspect_ratio:
            self.aspect_ratio = parse_aspect_ratio(self.aspect_ratio)
        if self.steps is not None and self.steps < 1:
            raise OptionError(f"--steps must be >= 1, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise OptionError(f"--guidance must be >= 0, got {self.guidance}")
        if self.n < 1:
            raise OptionError(f"--n must be >= 1, got {self.n}")
        if self.response_format not in RESPONSE_FORMATS:
            raise OptionError(f"--response-format must be one of {', '.join(RESPONSE_FORMATS)}")
        if self.n > 1 and self.response_format != "b64_json":
            # A body holds one image: the server refuses n > 1 as raw bytes, so every request would fail.
            raise OptionError(
                f"--n {self.n} needs --response-format b64_json: several images per request come only as JSON"
            )
        if self.iterations is not None and self.iterations < 1:
            raise OptionError(f"--iterations must be >= 1, got {self.iterations}")
        if self.timeout <= 0:
            raise OptionError(f"--timeout must be > 0, got {self.timeout}")
        if not self.prompt.strip() and not self.prompt_file:
            raise OptionError("--prompt is empty")
        self.prompts = read_prompt_file(self.prompt_file) if self.prompt_file else [self.prompt]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LoadOptions:
        env = os.environ if environ is None else environ
        casts: dict[str, Any] = {"steps": int, "seed": int, "n": int, "iterations": int}
        casts |= {"guidance": float, "timeout": float}
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                values[name] = casts.get(name, str)(raw)
            except ValueError:
                raise OptionError(f"env {var} must be a number, got {raw!r}") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The BENCH_* variables that make `from_env` rebuild these options (unset options are absent)."""
        out: dict[str, str] = {}
        for name, var in ENV.items():
            value = getattr(self, name)
            if value is not None and value != "":
                out[var] = str(value)
        return out

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
