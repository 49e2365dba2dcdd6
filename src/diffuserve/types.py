"""Typed messages and model families shared by every layer (API → serving → engine → models); imports only
diffuserve.enums (whose choices it re-exports), so any layer may use it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# Re-exported: every layer takes them from here.
from diffuserve.enums import JobState as JobState
from diffuserve.enums import Priority as Priority
from diffuserve.enums import StrChoice as StrChoice
from diffuserve.enums import Tier as Tier

# Varied subjects and styles, for FP8_ROUNDING=calibrated on the families that take any prompt.
CALIBRATION_PROMPTS = (
    "a photo of a red fox in a snowy forest at dawn, shallow depth of field",
    "a watercolor painting of a harbour town with sailing boats",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a neon sign that says OPEN on a brick wall at night",
)


@dataclass(frozen=True)
class Family:
    """What differs per model family, keyed by its pipeline class; the engine reads this, never the name."""

    name: str
    default_steps: int
    default_guidance: float
    max_sequence_length: int | None
    supports_negative_prompt: bool
    native_size: int
    size_multiple: int
    min_size: int
    max_size: int
    max_steps: int = 200
    pipeline: str = ""  # the `_class_name` of its model_index.json ("": matched by no class)
    # Families sharing a class: a word of the repo id, else a (config key, value) of the denoiser.
    repo_hint: str = ""
    variant: tuple[str, Any] | None = None
    denoiser: str = "transformer"  # the component that runs every step: "transformer" or "unet"
    tiers: tuple[str, ...] = ("E", "XL", "L", "M", "S")
    flux_hooks: bool = False  # FLUX.1's AdaLN tables, step cache (M/S) and ring attention
    cuda_graphs: bool = True  # the denoiser's call is capturable (checked per family)
    fused_qkv: bool = True
    blocks: tuple[str, ...] = ()  # repeated blocks to compile/quantize where the model declares none
    # Linears kept out of fp8 (L), by a part of their name: those that see only the prompt's tokens, whose few
    # rows cuBLASLt's fp8 kernels may not take (Qwen's txt_mlp down projection has no algorithm at 13 rows).
    fp8_skip: tuple[str, ...] = ()
    # The prompt's token count varies from call to call (no padding to a fixed length): compiled with dynamic
    # sizes, or every new prompt length would compile again.
    varying_text: bool = False
    # "auto": diffusers' image-to-image and inpainting via from_pipe; a class: the family's own edit pipeline
    # (pictures in, no strength, no mask); None: no edits.
    edit: str | None = "auto"
    text_pipeline: str | None = None  # text-to-image through this class, where the loaded one only edits
    guidance_kwarg: str = "guidance_scale"
    empty_negative: str | None = None  # the negative prompt true CFG needs when the client sends none
    # Latent layout for previews: "latents" (B×C×h×w), "packed" (FLUX.1's 2×2 tokens), "packed-frames" (Qwen:
    # packed, a frame axis), "patchified" (FLUX.2: 2×2 patches in channels, batch-normed); "auto"; None: none.
    previews: str | None = "auto"
    # FP8_ROUNDING=calibrated: the calls whose layer inputs weigh the rounding (at the native size, default steps).
    calibration_prompts: tuple[str, ...] = CALIBRATION_PROMPTS


_FLUX = {"pipeline": "FluxPipeline", "flux_hooks": True, "previews": "packed"}
_NEW = {"tiers": ("E", "XL", "L"), "edit": None}  # E, XL (compile) and L (fp8) on a transformer
# FLUX.1 and SDXL: reference/architectures.md. FLUX.1 Kontext: model card (guidance_scale=2.5), diffusers' 28
# steps. SD3.5: model cards (large 28 steps 3.5, medium 40 steps 4.5), T5 max_sequence_length 256 (pipeline).
# Qwen-Image(-Edit): model cards (50 steps, true_cfg_scale 4.0, negative_prompt " "), pipeline's 512 tokens,
# 1328² the card's 1:1 size. Z-Image-Turbo: model card (8 DiT forwards, guidance 0). FLUX.2 klein 4B: model
# card (4 steps, guidance 1.0, step-distilled). CUDA graphs off where capture is not verified on a GPU.
FLUX_SCHNELL = Family("flux-schnell", 4, 0.0, 256, False, 1024, 16, 256, 2048, **_FLUX, repo_hint="schnell", variant=("guidance_embeds", False))  # type: ignore[arg-type]  # fmt: skip
FLUX_DEV = Family("flux-dev", 28, 3.5, 512, False, 1024, 16, 256, 2048, **_FLUX, repo_hint="dev", variant=("guidance_embeds", True))  # type: ignore[arg-type]  # fmt: skip
FLUX_KONTEXT = Family("flux-kontext", 28, 2.5, 512, False, 1024, 16, 256, 2048, **{**_FLUX, "pipeline": "FluxKontextPipeline"}, edit="FluxKontextPipeline")  # type: ignore[arg-type]  # fmt: skip
SDXL = Family("sdxl", 30, 5.0, None, True, 1024, 8, 256, 2048, pipeline="StableDiffusionXLPipeline", denoiser="unet", tiers=("E", "XL", "L"), previews="latents")  # fmt: skip
# No fused QKV on SD3.5: diffusers' fused SD3 processor skips the RMS QK-norm (its output differed from eager).
_SD3 = {
    **_NEW,
    "pipeline": "StableDiffusion3Pipeline",
    "blocks": ("JointTransformerBlock",),
    "previews": "latents",
    "fused_qkv": False,
}
SD35_LARGE = Family("sd35-large", 28, 3.5, 256, True, 1024, 16, 256, 2048, **_SD3, repo_hint="large", variant=("num_layers", 38))  # type: ignore[arg-type]  # fmt: skip
SD35_MEDIUM = Family("sd35-medium", 40, 4.5, 256, True, 1024, 16, 256, 2048, **_SD3, repo_hint="medium", variant=("num_layers", 24))  # type: ignore[arg-type]  # fmt: skip
_QWEN = {**_NEW, "cuda_graphs": False, "guidance_kwarg": "true_cfg_scale", "empty_negative": " ", "previews": "packed-frames", "fp8_skip": ("txt_mlp",), "varying_text": True}  # fmt: skip
QWEN_IMAGE = Family("qwen-image", 50, 4.0, 512, True, 1328, 16, 256, 2048, pipeline="QwenImagePipeline", **_QWEN)  # type: ignore[arg-type]  # fmt: skip
QWEN_IMAGE_EDIT = Family("qwen-image-edit", 50, 4.0, 512, True, 1024, 16, 256, 2048, pipeline="QwenImageEditPipeline", **{**_QWEN, "edit": "QwenImageEditPipeline"}, text_pipeline="QwenImagePipeline")  # type: ignore[arg-type]  # fmt: skip
Z_IMAGE_TURBO = Family("z-image-turbo", 8, 0.0, 512, False, 1024, 16, 256, 2048, pipeline="ZImagePipeline", cuda_graphs=False, previews="latents", varying_text=True, **_NEW)  # type: ignore[arg-type]  # fmt: skip
FLUX2_KLEIN = Family("flux2-klein", 4, 1.0, 512, False, 1024, 16, 256, 2048, pipeline="Flux2KleinPipeline", cuda_graphs=False, previews="patchified", **_NEW)  # type: ignore[arg-type]  # fmt: skip
GENERIC = Family("generic", 30, 7.5, None, True, 512, 8, 64, 2048)
# The built-in models: 32×32 digits, small enough for a laptop CPU.
TINY_FLUX = Family("tiny-flux", 4, 0.0, 16, False, 32, 16, 16, 256, **_FLUX, calibration_prompts=tuple(f"a handwritten digit {n}" for n in range(10)))  # type: ignore[arg-type]  # fmt: skip

FAMILIES = {
    f.name: f
    for f in (
        FLUX_SCHNELL, FLUX_DEV, FLUX_KONTEXT, SDXL, SD35_LARGE, SD35_MEDIUM, QWEN_IMAGE, QWEN_IMAGE_EDIT,
        Z_IMAGE_TURBO, FLUX2_KLEIN, GENERIC, TINY_FLUX,
    )
}  # fmt: skip
# Pipeline class → its families, in the order they are told apart.
FAMILIES_BY_CLASS: dict[str, list[Family]] = {}
for _family in FAMILIES.values():
    if _family.pipeline and _family is not TINY_FLUX:
        FAMILIES_BY_CLASS.setdefault(_family.pipeline, []).append(_family)


class Task(StrChoice):
    """Which pipeline a request needs: text-to-image, or an edit of given pictures (with a mask: inpainting)."""

    GENERATE = "generate"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINT = "inpaint"


@dataclass
class EditInput:
    """An edit's pictures, decoded and resized to the output size by the API. Output image i starts from
    `images[i % len(images)]`; the mask, when given, applies to every one of them."""

    images: list[Any]  # H×W×3 uint8 numpy arrays
    mask: Any | None  # H×W uint8: 255 where the model repaints, 0 where the picture is kept
    strength: float

    @property
    def task(self) -> Task:
        return Task.INPAINT if self.mask is not None else Task.IMAGE_TO_IMAGE


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys can share one pipeline call."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float
    has_negative: bool
    task: Task = Task.GENERATE
    strength: float = 1.0


@dataclass(frozen=True)
class LoraUse:
    """One adapter a request applies: the name the client gave, its file, and the client's scale."""

    name: str
    path: str
    scale: float = 1.0


@dataclass
class GenerationRequest:
    """One validated client request, in the units the engine uses."""

    request_id: str
    model: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    output_format: str = "webp"
    output_compression: int | None = None
    negative_prompt: str | None = None
    edit: EditInput | None = None
    # Previews to send while denoising (streaming), 0-3.
    partial_images: int = 0
    # Where this request's first image sits in the client's request (a part of a split request starts later).
    first_image: int = 0
    # The adapters (LoRA) applied to this request's images, in the client's order.
    loras: tuple[LoraUse, ...] = ()
    priority: Priority = Priority.DEFAULT
    # Whether its worker reports each denoising step (jobs, and streams that asked for progress).
    report_progress: bool = False

    @property
    def seeds(self) -> list[int]:
        """`n > 1` uses consecutive seeds so image i is reproducible alone with seed + i."""
        return [(self.seed + i) % (2**63) for i in range(self.n)]

    def split(self, max_images: int) -> list[GenerationRequest]:
        """Parts of at most `max_images` images with consecutive seeds, so no batch exceeds MODEL_BATCH."""
        if self.n <= max_images:
            return [self]
        return [
            replace(
                self,
                n=min(max_images, self.n - start),
                seed=(self.seed + start) % (2**63),
                first_image=self.first_image + start,
            )
            for start in range(0, self.n, max_images)
        ]

    def to_item(self) -> BatchItem:
        return BatchItem(
            request_id=self.request_id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seeds=self.seeds,
            output_format=self.output_format,
            output_compression=self.output_compression,
            init_images=self._init_images(),
            mask=self.edit.mask if self.edit is not None else None,
            partial_images=self.partial_images,
            loras=self.loras,
            report_progress=self.report_progress,
        )

    def _init_images(self) -> list[Any] | None:
        if self.edit is None:
            return None
        pictures = self.edit.images
        return [pictures[(self.first_image + i) % len(pictures)] for i in range(self.n)]

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(
            model=self.model,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance=self.guidance,
            has_negative=bool(self.negative_prompt),
            task=self.edit.task if self.edit is not None else Task.GENERATE,
            strength=self.edit.strength if self.edit is not None else 1.0,
        )


# The JPEG/WebP quality when a client gives no output_compression.
DEFAULT_QUALITY = 90


def image_quality(compression: int | None) -> int:
    """JPEG/WebP quality from OpenAI's output_compression: the same scale (100 = best), this server's default
    when the client sends none; 0 is read as 1, the encoders' lowest."""
    return DEFAULT_QUALITY if compression is None else max(1, compression)


@dataclass
class BatchItem:
    """One request's share of a batch, as sent to a worker."""

    request_id: str
    prompt: str
    negative_prompt: str | None
    seeds: list[int]
    output_format: str
    output_compression: int | None
    # An edit's starting picture for each seed (H×W×3 uint8), and its mask (H×W uint8, 255 = repaint).
    init_images: list[Any] | None = None
    mask: Any | None = None
    partial_images: int = 0
    loras: tuple[LoraUse, ...] = ()
    report_progress: bool = False


@dataclass
class BatchJob:
    """A batch of compatible requests for one pipeline call."""

    batch_id: int
    width: int
    height: int
    steps: int
    guidance: float
    items: list[BatchItem]
    task: Task = Task.GENERATE
    strength: float = 1.0

    @property
    def formats(self) -> list[tuple[str, int | None]]:
        """(output_format, output_compression) of every image, in the batch's image order."""
        return [(item.output_format, item.output_compression) for item in self.items for _ in item.seeds]

    @property
    def num_images(self) -> int:
        return sum(len(item.seeds) for item in self.items)

    @property
    def reports_progress(self) -> bool:
        """Whether a request of this batch wants to hear of each denoising step."""
        return any(item.report_progress for item in self.items)

    @property
    def denoising_steps(self) -> int:
        """The steps the pipeline runs: an edit joins the schedule part-way, at about steps × strength."""
        if self.task is Task.GENERATE:
            return self.steps
        return max(1, round(self.steps * self.strength))

    @classmethod
    def of(cls, batch_id: int, requests: list[GenerationRequest]) -> BatchJob:
        """One job for compatible requests (same batch key); the first one gives the shared settings."""
        key = requests[0].batch_key
        return cls(
            batch_id=batch_id,
            width=key.width,
            height=key.height,
            steps=key.steps,
            guidance=key.guidance,
            items=[request.to_item() for request in requests],
            task=key.task,
            strength=key.strength,
        )


@dataclass
class EncodedImage:
    data: bytes
    seed: int
    media_type: str


@dataclass
class Completed:
    """A request's images and where its time went (milliseconds), as the serving layer hands them to the API."""

    images: list[EncodedImage]
    queue_ms: float
    inference_ms: float  # the device's share: denoise + decode
    batch_size: int
    worker_id: int
    denoise_ms: float = 0.0
    decode_ms: float = 0.0
    encode_ms: float = 0.0
    # Dispatch to delivery minus the device's and the encoder's time: the pipes both ways, and any wait for the
    # encoder stage while it finished the previous batch.
    transfer_ms: float = 0.0
    # The prompt's text tokens as the model's text encoder reads them (for `usage`).
    text_tokens: int = 0


@dataclass
class ModelInfo:
    """What a loaded engine tells the server about its model (limits and defaults for validation)."""

    name: str
    family: str
    repo: str
    tier: str
    default_steps: int
    default_guidance: float
    native_width: int
    native_height: int
    size_multiple: int
    min_size: int
    max_size: int
    max_steps: int
    supports_negative_prompt: bool
    max_batch: int
    # A worker group splits each image's tokens (token_pixels × token_pixels pixels each) across `parallel`
    # devices: a size is served only when its token count divides by `parallel`.
    parallel: int = 1
    token_pixels: int = 1
    # The edit pipelines diffusers has for this model (image-to-image, inpainting).
    edit_tasks: tuple[Task, ...] = ()
    # Whether an edit's strength applies: False where the model's own edit pipeline takes the picture as a
    # condition (FLUX.1 Kontext, Qwen-Image-Edit) and always runs every step.
    edit_strength: bool = True
    # Whether partial images can be sent while streaming (False: the API should refuse partial_images).
    previews: bool = True
    # Adapters: the most rank a request's adapters may add up to per layer (0: this server takes none), and
    # the layers they may change, name → (in, out) features.
    lora_max_rank: int = 0
    lora_targets: dict[str, tuple[int, int]] = field(default_factory=dict)

    def image_tokens(self, width: int, height: int) -> int:
        """The denoiser's positions for one width×height image (its image tokens in `usage`)."""
        return (width // self.token_pixels) * (height // self.token_pixels)

    def splits(self, width: int, height: int) -> bool:
        """Whether a width×height image's tokens divide evenly across the worker group's devices."""
        return self.image_tokens(width, height) % self.parallel == 0
