"""The typed messages between the server and its worker processes (IPC structs, as SGLang's io_struct): what a
worker is given at spawn, what crosses the pipe each way, and what the engine hands its worker's encoder stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffuserve.types import BatchJob, EncodedImage, ModelInfo


@dataclass
class BatchResult:
    """What a worker returns for a BatchJob: one image list per job item, in the job's order, or an error.

    Results are matched to requests by position, never by request id: ids come from clients and may repeat.
    """

    batch_id: int
    images: list[list[EncodedImage]] = field(default_factory=list)
    # The device's share: denoise (text encoders and the denoising loop) + decode (VAE, post-processing to
    # uint8 on the device and the copy to host memory). Encoding runs after the device is free again.
    inference_ms: float = 0.0
    denoise_ms: float = 0.0
    decode_ms: float = 0.0
    encode_ms: float = 0.0
    # Per job item: the prompt's tokens as the model's text encoder reads them (negative prompt included).
    text_tokens: list[int] = field(default_factory=list)
    # The batch's adapters: those read from their files (name → seconds) and those found in the cache.
    adapter_loads: dict[str, float] = field(default_factory=dict)
    adapter_hits: list[str] = field(default_factory=list)
    # Its prompts' text-encoder outputs: taken from the worker's prompt cache, and encoded (PROMPT_CACHE_MB).
    prompt_hits: int = 0
    prompt_misses: int = 0
    error: str | None = None


@dataclass
class PartialImages:
    """A preview of one job item's images, taken from the denoising loop while the batch runs (streaming).
    Sent before the batch's BatchResult; `partial_index` counts from 0 for each item."""

    batch_id: int
    item_index: int
    partial_index: int
    images: list[EncodedImage]


@dataclass
class StepProgress:
    """A running batch finished denoising step `step` of `steps` (sent only for batches whose requests asked
    for progress: jobs, and streams with `progress`)."""

    batch_id: int
    step: int
    steps: int


@dataclass
class CancelBatch:
    """Every client of a running batch has gone: the worker stops it at the next denoising step and answers
    with an error result (nobody reads it), so its device takes the next batch sooner."""

    batch_id: int


@dataclass
class DeviceFree:
    """The worker's device finished a batch's compute: it takes the next job while this batch's images are
    still being encoded. Its BatchResult follows; a worker that never sends this is freed by the result."""

    batch_id: int


@dataclass(frozen=True)
class GroupRank:
    """A worker group member's place in it, given at spawn: its rank among `devices` (rank 0 leads) and
    where the group's ranks meet (a TCP port on 127.0.0.1 chosen by the server)."""

    rank: int
    devices: tuple[str, ...]
    port: int
    timeout_s: float

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass
class StartupPhases:
    """Seconds of a worker's start-up phases once its code began (after the interpreter started): importing
    torch and diffusers, loading the model, applying its tier, each warm-up batch size, saving the compile
    cache."""

    import_s: float = 0.0
    load_s: float = 0.0
    # The seconds a GPU worker read its diffusers models' weights beside the imports (engine.early_read): not a
    # phase of its own, it overlaps `import` (and `load`, where the load waited for it).
    early_read_s: float = 0.0
    tier_s: float = 0.0
    warmup_s: dict[int, float] = field(default_factory=dict)  # by batch size
    warmup_steps: dict[int, int] = field(default_factory=dict)  # the steps each size's warm-up ran
    compile_cache_save_s: float = 0.0

    def named(self) -> dict[str, float]:
        """`import`, `load`, `early_read` (where a read ran beside the imports), `tier`, `warmup_b<N>` (largest
        batch first), `compile_cache_save`."""
        named = {"import": self.import_s, "load": self.load_s}
        if self.early_read_s:
            named["early_read"] = self.early_read_s
        named["tier"] = self.tier_s
        named.update({f"warmup_b{size}": s for size, s in sorted(self.warmup_s.items(), reverse=True)})
        named["compile_cache_save"] = self.compile_cache_save_s
        return named


def warm_order(max_batch: int) -> list[int]:
    """The order a GPU worker warms its batch sizes in: 1 first (ready then, and every request can be served),
    then the largest and on down."""
    return [1, *range(max_batch, 1, -1)]


@dataclass
class WorkerReady:
    worker_id: int
    pid: int
    device: str
    model: ModelInfo
    # time.monotonic() when the child's worker code began (after the interpreter started), and the phases since.
    entered_at: float = 0.0
    phases: StartupPhases = field(default_factory=StartupPhases)
    # The batch sizes warm at ready, where the worker warms the others after it (BatchSizeWarm says each);
    # None: every size up to the model's batch runs without compiling.
    warm_sizes: tuple[int, ...] | None = None


@dataclass
class BatchSizeWarm:
    """A ready worker warmed one more batch size (compiled, captured) between batches, in `seconds`; the
    scheduler may now give it batches of that size."""

    worker_id: int
    size: int
    seconds: float


@dataclass
class CompileCacheSaved:
    """The worker saved its compile artefacts once its last batch size was warm, in `seconds`: to `path`, which
    a start from the same cache dir loads instead of generating its kernels; None where nothing was compiled
    (CPU) or the write failed (the worker's log says why)."""

    worker_id: int
    path: str | None
    seconds: float


@dataclass
class WorkerPhase:
    """A starting worker's progress, for readiness: `importing` (torch, diffusers, the pipeline's modules),
    `loading` (weights to the device), `accelerating` (the tier applied: fp8, compile set up, CUDA graphs), then
    `warming` (the first batch size, which compiles where the tier compiles); `detail` says what exactly (the
    weights' size, the tier, the batch size)."""

    worker_id: int
    phase: str
    detail: str = ""


@dataclass
class WorkerFailed:
    """A worker could not start (bad model path, out of memory …); the message is shown to the operator.
    `fatal`: starting again would fail the same way; false for a passing failure (a group's rendezvous) or a
    group rank's failed batch."""

    worker_id: int
    error: str
    fatal: bool = True


@dataclass
class Shutdown:
    """Sent to a worker to make it exit cleanly."""


@dataclass
class DeviceBatch:
    """A batch once the device is done with it: uint8 pixels in host memory, ready for the encoder stage."""

    job: BatchJob
    pixels: Any  # N×H×W×3 uint8 numpy array, in the job's image order
    denoise_ms: float
    decode_ms: float
    # Images the device encoded itself (nvJPEG), by position in the batch, with the time that took.
    device_encoded: dict[int, bytes] = field(default_factory=dict)
    device_encode_ms: float = 0.0
    text_tokens: list[int] = field(default_factory=list)
    adapter_loads: dict[str, float] = field(default_factory=dict)
    adapter_hits: list[str] = field(default_factory=list)
    prompt_hits: int = 0
    prompt_misses: int = 0

    @property
    def inference_ms(self) -> float:
        return self.denoise_ms + self.decode_ms


@dataclass
class Preview:
    """One job item's preview: its images' pixels (n×H×W×3 uint8 numpy array) after some denoising step."""

    item_index: int
    partial_index: int
    pixels: Any


@dataclass
class PreviewBatch:
    """The previews a batch took at one step, waiting for the encoder stage."""

    job: BatchJob
    previews: list[Preview] = field(default_factory=list)
