"""A BatchJob as one pipeline call: its arguments, its step callback (cancellation, previews, the end of each
step), its text tokens as the model reads them (for `usage`) and its errors in words for the client."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

from diffuserve.engine.edits import edit_kwargs
from diffuserve.engine.previews import PreviewTaker
from diffuserve.engine.tiers.calibrate import Calibration
from diffuserve.types import BatchItem, BatchJob, Family


class BatchCancelled(Exception):
    """Raised from the step callback to leave the denoising loop of a batch nobody waits for."""


def pipeline_kwargs(job: BatchJob, family: Family, accepted: set[str], output_type: str) -> dict[str, Any]:
    """The pipeline's arguments for `job`, those of them its `__call__` takes (`accepted`)."""
    import torch

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
    kwargs.update(edit_kwargs(job, accepted))
    if "output_type" in accepted:
        kwargs["output_type"] = output_type
    if family.guidance_kwarg in accepted:  # Qwen-Image's true_cfg_scale, everyone else's guidance_scale
        kwargs[family.guidance_kwarg] = job.guidance
    if family.max_sequence_length and "max_sequence_length" in accepted:
        kwargs["max_sequence_length"] = family.max_sequence_length
    if "max_area" in accepted:  # FLUX.1 Kontext rescales its output to this area (diffusers' default 1024²)
        kwargs["max_area"] = job.width * job.height
    # True CFG (Qwen-Image) runs only with a negative prompt: the family's empty one stands in for a client's.
    true_cfg = family.empty_negative is not None and job.guidance > 1
    if true_cfg or any(item.negative_prompt for item in job.items):
        empty = family.empty_negative or ""
        kwargs["negative_prompt"] = [item.negative_prompt or empty for item in job.items for _ in item.seeds]
    return kwargs


def calibration_calls(pipeline: Any, family: Family, max_batch: int) -> Calibration:
    """FP8_ROUNDING=calibrated's calls: the family's calibration prompts as text-to-image batches of at most
    `max_batch` at its native size and default steps and guidance (seeds 0, 1, …), latents out (no decode)."""
    size, steps, guidance = family.native_size, family.default_steps, family.default_guidance
    prompts = family.calibration_prompts
    items = [
        BatchItem("calibration", prompt, None, [seed], "png", None) for seed, prompt in enumerate(prompts)
    ]
    per_call = max(1, max_batch)
    jobs = [
        BatchJob(0, size, size, steps, guidance, items[start : start + per_call])
        for start in range(0, len(items), per_call)
    ]
    accepted = set(inspect.signature(pipeline.__call__).parameters)
    context = f"{family.name}: {list(prompts)!r}, {size}x{size}, {steps} steps, guidance {guidance}"

    def run() -> None:
        for job in jobs:  # new generators for each run: every group of layers sees the same calls
            pipeline(**pipeline_kwargs(job, family, accepted, "latent"))

    return Calibration(run, context)


class StepMarks:
    """When the last denoising step ended: an event on the device's stream (recording it costs no
    synchronisation) or a host clock. It splits a batch's time into denoise (text encoders and the steps) and
    decode (VAE, post-processing to uint8, the copy to host memory)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.last: Any = None

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def since_last_step_ms(self) -> float:
        """From the last step's end to now (call it once the pixels are in host memory); 0 with no step."""
        if self.last is None:
            return 0.0
        now = self.now()
        if self.cuda:
            now.synchronize()
            return float(self.last.elapsed_time(now))
        return (now - self.last) * 1000


def step_callback(
    marks: StepMarks,
    cancelled: Callable[[], bool] | None,
    previews: PreviewTaker | None,
    on_step: Callable[[int], None] | None = None,
) -> Callable[..., dict[str, Any]]:
    """The pipeline's step-end callback: report the step (counted from 1) where asked, stop a batch nobody
    waits for, take the previews asked for, and mark the step's end."""

    def on_step_end(_pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step + 1)
        if cancelled is not None and cancelled():
            raise BatchCancelled()
        if previews is not None:
            previews(step, tensors["latents"])
        marks.last = marks.now()
        return tensors

    return on_step_end


def describe_failure(exc: Exception) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "the GPU ran out of memory for this batch; try fewer images or a smaller size"
    return f"{name}: {exc}"


def poisons_device(exc: Exception) -> bool:
    """A CUDA error other than out-of-memory (a device-side assert, an illegal address) leaves the CUDA
    context unusable: every later batch would fail too."""
    text = f"{type(exc).__name__}: {exc}"
    return "OutOfMemory" not in text and ("CUDA error" in text or type(exc).__name__ == "AcceleratorError")


def release_cuda_memory() -> None:
    import torch

    with contextlib.suppress(Exception):  # best effort after a failure; never mask the original error
        torch.cuda.empty_cache()


def prompt_tokenizer(pipeline: Any) -> Any:
    """The tokenizer of the text encoder whose sequence the denoiser attends to: T5's for FLUX (the second
    encoder; CLIP only gives it a pooled vector), CLIP's for SDXL and single-encoder pipelines."""
    if hasattr(pipeline, "_pack_latents") and getattr(pipeline, "tokenizer_2", None) is not None:
        return pipeline.tokenizer_2
    return getattr(pipeline, "tokenizer", None)


def count_text_tokens(tokenizer: Any, prompts: list[str], max_length: int | None) -> list[int]:
    """Tokens per prompt, special tokens included and cut where the pipeline cuts (`max_length`, else the
    tokenizer's own limit); 0 for every prompt where the model has no tokenizer."""
    if tokenizer is None:
        return [0] * len(prompts)
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" is a huge sentinel
        limit = None
    encoded = tokenizer(prompts, truncation=limit is not None, max_length=limit)
    return [len(ids) for ids in encoded["input_ids"]]


def text_tokens(tokenizer: Any, job: BatchJob, max_length: int | None) -> list[int]:
    """Each item's prompt tokens, plus its negative prompt's."""
    counts = count_text_tokens(tokenizer, [item.prompt for item in job.items], max_length)
    negatives = [item.negative_prompt or "" for item in job.items]
    if not any(negatives):
        return counts
    extra = count_text_tokens(tokenizer, negatives, max_length)
    return [
        count + (more if negative else 0)
        for count, more, negative in zip(counts, extra, negatives, strict=True)
    ]
