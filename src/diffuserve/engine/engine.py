"""The engine a worker owns: load once, warm up, then turn BatchJobs into pixels on the device and encode them."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffuserve.config import Settings
from diffuserve.engine.edits import edit_kwargs, edit_pipelines, keep_outside_mask
from diffuserve.engine.encode import MEDIA_TYPES
from diffuserve.engine.encoder import BatchEncoder, gpu_jpeg_encoder
from diffuserve.engine.frames import DecodeClock, to_uint8
from diffuserve.engine.loader import LoadedPipeline, load_pipeline
from diffuserve.engine.naming import served_model_name
from diffuserve.engine.previews import PreviewBatch, PreviewTaker
from diffuserve.engine.tokens import count_text_tokens, prompt_tokenizer
from diffuserve.types import (
    BatchItem,
    BatchJob,
    BatchResult,
    EncodedImage,
    Family,
    GroupRank,
    ModelInfo,
    PartialImages,
    Task,
)

if TYPE_CHECKING:
    from diffuserve.engine.graphs import CudaGraphHook

log = logging.getLogger(__name__)


def model_info(
    settings: Settings,
    family: Family,
    accepted: set[str] | None = None,
    *,
    parallel: int = 1,
    token_pixels: int = 1,
    edit_tasks: tuple[Task, ...] = (),
) -> ModelInfo:
    return ModelInfo(
        name=served_model_name(settings),
        family=family.name,
        repo=settings.model_repo,
        tier=settings.model_size,
        default_steps=family.default_steps,
        default_guidance=family.default_guidance,
        native_width=family.native_size,
        native_height=family.native_size,
        size_multiple=family.size_multiple,
        min_size=family.min_size,
        max_size=family.max_size,
        max_steps=family.max_steps,
        # Only where the family uses it and this pipeline's __call__ takes it.
        supports_negative_prompt=family.supports_negative_prompt
        and (accepted is None or "negative_prompt" in accepted),
        max_batch=settings.model_batch,
        parallel=parallel,
        token_pixels=token_pixels,
        edit_tasks=edit_tasks,
    )


@dataclass
class DeviceBatch:
    """A batch once the device is done with it: uint8 pixels in host memory, ready for the encoder stage."""

    job: BatchJob
    pixels: np.ndarray  # N×H×W×3 uint8, in the job's image order
    denoise_ms: float
    decode_ms: float
    # Images the device encoded itself (nvJPEG), by position in the batch, with the time that took.
    device_encoded: dict[int, bytes] = field(default_factory=dict)
    device_encode_ms: float = 0.0
    text_tokens: list[int] = field(default_factory=list)

    @property
    def inference_ms(self) -> float:
        return self.denoise_ms + self.decode_ms


class Engine:
    """A loaded pipeline plus the knowledge of how to call it for a batch. Not thread-safe: one per process.

    `compute` is the device's part (denoise, decode, uint8 in host memory) and `encode` the CPU's, so a worker
    can run them in different threads: the next batch denoises while the last one is encoded.
    """

    def __init__(self, settings: Settings, device: str, group: GroupRank | None = None) -> None:
        self.settings = settings
        self.device = device
        # This process's place in a worker group whose ranks run every pipeline call together, or None.
        self.group = group
        self._follower = group is not None and not group.leader
        self.loaded: LoadedPipeline | None = None
        self.info: ModelInfo | None = None
        self.phases: dict[str, float] = {}
        # The loaded pipeline (Task.GENERATE) and the edit pipelines made from it, with what each call takes.
        self._pipelines: dict[Task, Any] = {}
        self._accepted_by: dict[Task, set[str]] = {}
        self._tokenizer: Any = None
        self._clock: DecodeClock | None = None
        self._encoder = BatchEncoder()
        self._gpu_jpeg = gpu_jpeg_encoder(device)
        self._graphs: CudaGraphHook | None = None
        # Whether a group's ranks decode each batch's latents together (see `split_decode`).
        self._joint_decode = False
        # Set after a CUDA error that leaves the device unusable: the worker then exits and is replaced.
        self.broken = False

    def load(self) -> ModelInfo:
        from diffuserve.engine.tiers import Tier, apply_tier

        s = self.settings
        started = time.perf_counter()
        self.loaded = load_pipeline(
            s.model_repo, device=self.device, dtype_name=s.dtype, weights=s.weights, hf_token=s.hf_token
        )
        self.phases["load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        apply_tier(
            self.loaded.pipeline, Tier(s.model_size), device=self.device, cache_dir=s.resolved_cache_dir
        )
        self.phases["tier_s"] = time.perf_counter() - started
        from diffuserve.engine.parallel import parallelize, resolve_attention, token_pixels

        graphs, why = self._graphs_wanted()
        parallel, pixels = 1, token_pixels(self.loaded.pipeline)
        if self.group is not None:
            # After the tier: its attention processors (fused QKV) must be the ones that learn the group.
            parallel = self.group.world_size
            attention = resolve_attention(s.parallel_attention, graphs=graphs)
            if attention != s.parallel_attention:
                log.info(
                    "PARALLEL_ATTENTION=%s: %s, as the denoiser %s as CUDA graphs",
                    s.parallel_attention,
                    attention,
                    "runs" if graphs else "does not run",
                )
            pixels = parallelize(
                self.loaded,
                parallel,
                attention,
                timeout_s=self.group.timeout_s,
                # auto's choice falls back where the GPUs cannot share memory; an explicit one is refused.
                p2p_fallback="ulysses-diffusers" if s.parallel_attention == "auto" else None,
            )
        log.info(why)
        if self.group is not None:
            from diffuserve.engine.split_decode import split_vae_decode

            whole = (
                split_vae_decode(self.loaded.pipeline, self.group.world_size)
                if s.parallel_decode
                else "PARALLEL_DECODE is off"
            )
            self._joint_decode = whole is None
            log.info(
                "VAE decode: %s",
                "split by rows across the group" if whole is None else f"on the leader alone ({whole})",
            )
        if graphs:
            self._capture_graphs()
        self._clock = DecodeClock(self.loaded.pipeline, self.device)
        # After the tier and the group: the edit pipelines share the (compiled, quantized, split) denoiser.
        self._pipelines = {Task.GENERATE: self.loaded.pipeline, **edit_pipelines(self.loaded.pipeline)}
        self._accepted_by = {
            task: set(inspect.signature(pipe.__call__).parameters) for task, pipe in self._pipelines.items()
        }
        self._tokenizer = prompt_tokenizer(self.loaded.pipeline)
        edits = tuple(task for task in self._pipelines if task is not Task.GENERATE)
        self.info = model_info(
            s,
            self.loaded.family,
            self._accepted_by[Task.GENERATE],
            parallel=parallel,
            token_pixels=pixels,
            edit_tasks=edits,
        )
        return self.info

    def _graphs_wanted(self) -> tuple[bool, str]:
        from diffuserve.engine.graphs import graphs_wanted
        from diffuserve.engine.tiers import recipe_for

        recipe = recipe_for(self.settings.model_size)
        return graphs_wanted(
            self.settings.cuda_graphs, device=self.device, recipe=recipe, group=self.group is not None
        )

    def _capture_graphs(self) -> None:
        """After the group's split, so the graphs hold its collectives too."""
        from diffuserve.engine.graphs import enable_cuda_graphs
        from diffuserve.engine.tiers import denoiser_of

        assert self.loaded is not None
        model = denoiser_of(self.loaded.pipeline)
        if model is not None:
            self._graphs = enable_cuda_graphs(model)

    def close(self) -> None:
        """Before the group's communicators go: NCCL's teardown waits for ever on a communicator that a
        live CUDA graph still holds collectives of (seen with torch 2.11)."""
        if self._graphs is not None:
            self._graphs.release()

    def warmup(self) -> float:
        """Run the native size before serving, so no user pays for lazy init or compilation.

        On a GPU every batch size 1..MODEL_BATCH is run: compiled graphs are specialised per batch size, and
        a lone request after a batch-4-only warm-up would compile for 15 s or more. The full batch runs
        the default steps (and every output format, so each encoder path is loaded); the smaller ones one
        step, which is enough to compile their shapes, or two where CUDA graphs are on (the second captures).
        """
        assert self.info is not None
        started = time.perf_counter()
        info = self.info
        sizes = [info.max_batch]
        if self.device.startswith("cuda"):
            sizes = list(range(info.max_batch, 0, -1))
        formats = list(MEDIA_TYPES)
        small = 2 if self._graphs is not None else 1
        for size in sizes:
            size_started = time.perf_counter()
            steps = max(info.default_steps, small) if size == info.max_batch else small
            items = [
                BatchItem("warmup", "warm-up", None, [i], formats[i % len(formats)], None)
                for i in range(size)
            ]
            job = BatchJob(-1, info.native_width, info.native_height, steps, info.default_guidance, items)
            result = self.run(job)
            if result.error:
                raise RuntimeError(f"warm-up at batch {size} failed: {result.error}")
            self.phases[f"warmup_b{size}_s"] = time.perf_counter() - size_started
        return time.perf_counter() - started

    def _pipeline_kwargs(self, job: BatchJob) -> dict[str, Any]:
        import torch

        assert self.loaded is not None
        accepted = self._accepted_by[job.task]
        prompts = [item.prompt for item in job.items for _ in item.seeds]
        # One CPU generator per image: a seed gives the same noise whatever batch or device it lands in.
        generators = [torch.Generator("cpu").manual_seed(seed) for item in job.items for seed in item.seeds]
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "height": job.height,
            "width": job.width,
            "num_inference_steps": job.steps,
            "generator": generators,
        }
        kwargs.update(edit_kwargs(job))
        if "output_type" in accepted:
            # A tensor on the device: converting to uint8 there is nearly free, and only 1/4 of the bytes of a
            # float32 copy (what diffusers' PIL output makes first) cross to the host. A group's follower shares
            # the denoiser's work, and the decode's where the ranks decode together; its images are the leader's
            # to send.
            kwargs["output_type"] = "latent" if self._follower and not self._joint_decode else "pt"
        if "guidance_scale" in accepted:
            kwargs["guidance_scale"] = job.guidance
        family = self.loaded.family
        if family.max_sequence_length and "max_sequence_length" in accepted:
            kwargs["max_sequence_length"] = family.max_sequence_length
        if any(item.negative_prompt for item in job.items):
            kwargs["negative_prompt"] = [item.negative_prompt or "" for item in job.items for _ in item.seeds]
        return kwargs

    def compute(
        self,
        job: BatchJob,
        cancelled: Callable[[], bool] | None = None,
        on_preview: Callable[[PreviewBatch], None] | None = None,
    ) -> DeviceBatch | BatchResult:
        """The device's part of a batch; a failure comes back as a BatchResult with its error. `cancelled` is
        asked at every denoising step: once it says yes, the batch stops there. `on_preview` receives the
        previews of the items that asked for partial images, while the batch runs."""
        assert self.loaded is not None and self._clock is not None
        started = time.perf_counter()
        try:
            self._clock.start()
            pipeline = self._pipelines.get(job.task)
            if pipeline is None:
                raise RuntimeError(f"this model has no {job.task} pipeline")
            kwargs = self._pipeline_kwargs(job)
            previews = (
                None if on_preview is None or self._follower else PreviewTaker(pipeline, job, on_preview)
            )
            callback = _step_callback(
                cancelled, previews if previews is not None and previews.wanted else None
            )
            if callback is not None and "callback_on_step_end" in self._accepted_by[job.task]:
                kwargs["callback_on_step_end"] = callback
            output = pipeline(**kwargs)
            images = output.images
            if len(images) != job.num_images:
                raise RuntimeError(f"pipeline returned {len(images)} images for {job.num_images} requested")
            if self._follower:
                return DeviceBatch(job, np.empty((0, 0, 0, 3), dtype=np.uint8), 0.0, 0.0)
            if job.task is Task.INPAINT and not isinstance(images, (list, np.ndarray)):
                images = keep_outside_mask(images, job)
            pixels, on_device = to_uint8(images)
            decode_ms = self._clock.decode_ms(self._clock.finished())
            inference_ms = (time.perf_counter() - started) * 1000
            decode_ms = min(decode_ms, inference_ms)
            batch = DeviceBatch(job, pixels, inference_ms - decode_ms, decode_ms)
            batch.text_tokens = self._text_tokens(job)
            if on_device is not None:
                self._encode_on_device(batch, on_device)
            return batch
        except BatchCancelled:
            log.info("batch %s stopped after its clients left", job.batch_id)
            return BatchResult(batch_id=job.batch_id, error="cancelled: every client of this batch left")
        except Exception as exc:  # a failed batch must not take the worker down
            log.exception("batch %s failed", job.batch_id)
            # In a group, the peers of a rank whose batch failed may be waiting inside a collective: the whole
            # group is replaced rather than left out of step.
            self.broken = self.group is not None or _poisons_device(exc)
            _release_cuda_memory()
            return BatchResult(batch_id=job.batch_id, error=_describe(exc))

    def _encode_on_device(self, batch: DeviceBatch, pixels: Any) -> None:
        """JPEGs straight from the device's uint8 tensor (nvJPEG), where this worker has it: a fraction of a
        millisecond each instead of several on a CPU core."""
        if self._gpu_jpeg is None:
            return
        formats = batch.job.formats
        wanted = [i for i, (fmt, _) in enumerate(formats) if fmt == "jpeg"]
        if not wanted:
            return
        started = time.perf_counter()
        batch.device_encoded = self._gpu_jpeg(pixels, wanted, [formats[i][1] for i in wanted])
        batch.device_encode_ms = (time.perf_counter() - started) * 1000

    def encode(self, batch: DeviceBatch) -> BatchResult:
        """The CPU's part: every image in its requested format, grouped back by request."""
        job = batch.job
        started = time.perf_counter()
        try:
            encoded = self._encoder.encode(batch.pixels, job.formats, done=batch.device_encoded)
        except Exception as exc:  # an encoder failure fails this batch only
            log.exception("encoding batch %s failed", job.batch_id)
            return BatchResult(batch_id=job.batch_id, error=_describe(exc))
        result = BatchResult(
            batch_id=job.batch_id,
            inference_ms=batch.inference_ms,
            denoise_ms=batch.denoise_ms,
            decode_ms=batch.decode_ms,
            encode_ms=(time.perf_counter() - started) * 1000 + batch.device_encode_ms,
            text_tokens=batch.text_tokens,
        )
        cursor = 0
        for item in job.items:
            media_type = MEDIA_TYPES[item.output_format]
            result.images.append(
                [EncodedImage(encoded[cursor + i], seed, media_type) for i, seed in enumerate(item.seeds)]
            )
            cursor += len(item.seeds)
        return result

    def encode_previews(self, batch: PreviewBatch) -> list[PartialImages]:
        """A step's previews in each item's output format, one message per item. A preview that cannot be
        encoded is left out (its request still gets its final image)."""
        messages = []
        for preview in batch.previews:
            item = batch.job.items[preview.item_index]
            formats = [(item.output_format, item.output_compression)] * len(preview.pixels)
            try:
                encoded = self._encoder.encode(preview.pixels, formats)
            except Exception:
                log.exception("a preview of batch %s could not be encoded", batch.job.batch_id)
                continue
            media_type = MEDIA_TYPES[item.output_format]
            images = [
                EncodedImage(data, seed, media_type) for data, seed in zip(encoded, item.seeds, strict=True)
            ]
            messages.append(
                PartialImages(batch.job.batch_id, preview.item_index, preview.partial_index, images)
            )
        return messages

    def _text_tokens(self, job: BatchJob) -> list[int]:
        """Each item's prompt tokens (and its negative prompt's) as the model's text encoder reads them."""
        assert self.loaded is not None
        limit = self.loaded.family.max_sequence_length
        prompts = [item.prompt for item in job.items]
        counts = count_text_tokens(self._tokenizer, prompts, limit)
        negatives = [item.negative_prompt or "" for item in job.items]
        if any(negatives):
            counts = [
                count + (extra if negative else 0)
                for count, extra, negative in zip(
                    counts, count_text_tokens(self._tokenizer, negatives, limit), negatives, strict=True
                )
            ]
        return counts

    def run(self, job: BatchJob) -> BatchResult:
        """Both parts in one call (warm-up, `diffuserve generate`)."""
        computed = self.compute(job)
        if isinstance(computed, BatchResult):
            return computed
        if self._follower:  # nothing of its own to encode
            return BatchResult(batch_id=job.batch_id, inference_ms=computed.inference_ms)
        return self.encode(computed)


class BatchCancelled(Exception):
    """Raised from the step callback to leave the denoising loop of a batch nobody waits for."""


def _step_callback(
    cancelled: Callable[[], bool] | None, previews: PreviewTaker | None
) -> Callable[..., dict[str, Any]] | None:
    """The pipeline's step-end callback: stop a batch nobody waits for, and take the previews asked for."""
    if cancelled is None and previews is None:
        return None

    def on_step_end(_pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if cancelled is not None and cancelled():
            raise BatchCancelled()
        if previews is not None:
            previews(step, tensors["latents"])
        return tensors

    return on_step_end


def _describe(exc: Exception) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "the GPU ran out of memory for this batch; try fewer images or a smaller size"
    return f"{name}: {exc}"


def _poisons_device(exc: Exception) -> bool:
    """A CUDA error other than out-of-memory (a device-side assert, an illegal address) leaves the CUDA
    context unusable: every later batch would fail too."""
    text = f"{type(exc).__name__}: {exc}"
    return "OutOfMemory" not in text and ("CUDA error" in text or type(exc).__name__ == "AcceleratorError")


def _release_cuda_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort after a failure; never mask the original error
        pass
