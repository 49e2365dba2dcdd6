"""The engine a worker owns: load once, warm up, then turn BatchJobs into encoded images."""

from __future__ import annotations

import inspect
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from diffuserve.config import Settings
from diffuserve.engine.encode import MEDIA_TYPES, encode_image
from diffuserve.engine.loader import LoadedPipeline, load_pipeline
from diffuserve.engine.naming import served_model_name
from diffuserve.types import BatchItem, BatchJob, BatchResult, EncodedImage, Family, ModelInfo

log = logging.getLogger(__name__)


def model_info(settings: Settings, family: Family, accepted: set[str] | None = None) -> ModelInfo:
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
    )


class Engine:
    """A loaded pipeline plus the knowledge of how to call it for a batch. Not thread-safe: one per process."""

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.loaded: LoadedPipeline | None = None
        self.info: ModelInfo | None = None
        self._accepted: set[str] = set()
        self._encoder: ThreadPoolExecutor | None = None
        # Set after a CUDA error that leaves the device unusable: the worker then exits and is replaced.
        self.broken = False

    def load(self) -> ModelInfo:
        from diffuserve.engine.tiers import Tier, apply_tier

        s = self.settings
        self.loaded = load_pipeline(
            s.model_repo, device=self.device, dtype_name=s.dtype, weights=s.weights, hf_token=s.hf_token
        )
        self._accepted = set(inspect.signature(self.loaded.pipeline.__call__).parameters)
        apply_tier(
            self.loaded.pipeline, Tier(s.model_size), device=self.device, cache_dir=s.resolved_cache_dir
        )
        self.info = model_info(s, self.loaded.family, self._accepted)
        return self.info

    def warmup(self) -> float:
        """Run the native size before serving, so no user pays for lazy init or compilation.

        On a GPU every batch size 1..MODEL_BATCH is run: compiled graphs are specialised per batch size, and
        a lone request after a batch-4-only warm-up would compile for 15 s or more. The full batch runs
        the default steps; the smaller ones two steps, which is enough to compile their shapes.
        """
        assert self.info is not None
        started = time.perf_counter()
        info = self.info
        sizes = [info.max_batch]
        if self.device.startswith("cuda"):
            sizes = list(range(info.max_batch, 0, -1))
        for size in sizes:
            steps = info.default_steps if size == info.max_batch else min(2, info.default_steps)
            job = BatchJob(
                batch_id=-1,
                width=info.native_width,
                height=info.native_height,
                steps=steps,
                guidance=info.default_guidance,
                items=[BatchItem("warmup", "warm-up", None, list(range(size)), "png", None)],
            )
            result = self.run(job)
            if result.error:
                raise RuntimeError(f"warm-up at batch {size} failed: {result.error}")
        return time.perf_counter() - started

    def _pipeline_kwargs(self, job: BatchJob) -> dict[str, Any]:
        import torch

        assert self.loaded is not None
        prompts = [item.prompt for item in job.items for _ in item.seeds]
        # One CPU generator per image: a seed gives the same noise whatever batch or device it lands in.
        generators = [torch.Generator("cpu").manual_seed(seed) for item in job.items for seed in item.seeds]
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "height": job.height,
            "width": job.width,
            "num_inference_steps": job.steps,
            "generator": generators,
            "output_type": "pil",
        }
        if "guidance_scale" in self._accepted:
            kwargs["guidance_scale"] = job.guidance
        family = self.loaded.family
        if family.max_sequence_length and "max_sequence_length" in self._accepted:
            kwargs["max_sequence_length"] = family.max_sequence_length
        if any(item.negative_prompt for item in job.items):
            kwargs["negative_prompt"] = [item.negative_prompt or "" for item in job.items for _ in item.seeds]
        return kwargs

    def _encode_all(self, images: list[Any], formats: list[tuple[str, int | None]]) -> list[bytes]:
        """Encode a batch's images in parallel: Pillow's encoders release the GIL, and at 1024² each takes
        tens of milliseconds the GPU would otherwise sit idle for."""
        if len(images) == 1:
            return [encode_image(images[0], *formats[0])]
        if self._encoder is None:
            self._encoder = ThreadPoolExecutor(
                max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="encode"
            )
        return list(
            self._encoder.map(lambda pair: encode_image(pair[0], *pair[1]), zip(images, formats, strict=True))
        )

    def run(self, job: BatchJob) -> BatchResult:
        assert self.loaded is not None
        started = time.perf_counter()
        try:
            output = self.loaded.pipeline(**self._pipeline_kwargs(job))
            images = list(output.images)
            if len(images) != job.num_images:
                raise RuntimeError(f"pipeline returned {len(images)} images for {job.num_images} requested")
            inference_ms = (time.perf_counter() - started) * 1000
            result = BatchResult(batch_id=job.batch_id, inference_ms=inference_ms)
            formats = [
                (item.output_format, item.output_compression) for item in job.items for _ in item.seeds
            ]
            encoded = self._encode_all(images, formats)
            cursor = 0
            for item in job.items:
                media_type = MEDIA_TYPES[item.output_format]
                result.images.append(
                    [EncodedImage(encoded[cursor + i], seed, media_type) for i, seed in enumerate(item.seeds)]
                )
                cursor += len(item.seeds)
            return result
        except Exception as exc:  # a failed batch must not take the worker down
            log.exception("batch %s failed", job.batch_id)
            self.broken = _poisons_device(exc)
            _release_cuda_memory()
            return BatchResult(batch_id=job.batch_id, error=_describe(exc))


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
