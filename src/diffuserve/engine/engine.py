"""The engine a worker owns: load once, warm up, then turn BatchJobs into pixels on the device and encode them."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from diffuserve.engine.calls import (
    BatchCancelled,
    StepMarks,
    calibration_calls,
    describe_failure,
    pipeline_kwargs,
    poisons_device,
    prompt_tokenizer,
    release_cuda_memory,
    step_callback,
    text_tokens,
)
from diffuserve.engine.config import EngineConfig, Fp8Rounding
from diffuserve.engine.edits import edit_pipelines, keep_outside_mask, text_pipeline
from diffuserve.engine.frames import gpu_jpeg_encoder, to_uint8
from diffuserve.engine.loader import (
    LoadedPipeline,
    check_tier,
    import_pipeline_class,
    load_pipeline,
    model_info,
    weights_bytes,
)
from diffuserve.engine.preimport import start_preimport, tier_modules
from diffuserve.engine.previews import PreviewTaker
from diffuserve.engine.prompt_cache import CALL_PARAMETERS, PromptCache, takes_embeddings
from diffuserve.messages import (
    BatchResult,
    DeviceBatch,
    GroupRank,
    PreviewBatch,
    StartupPhases,
    warm_order,
)
from diffuserve.types import BatchItem, BatchJob, ModelInfo, Task

log = logging.getLogger(__name__)


class Engine:
    """A loaded pipeline plus the knowledge of how to call it for a batch. Not thread-safe: one per process.

    `compute` is the device's part (denoise, decode, uint8 pixels in host memory); the worker's encoder stage
    encodes them on the CPU while the next batch denoises.
    """

    def __init__(self, config: EngineConfig, device: str, group: GroupRank | None = None) -> None:
        self.config = config
        self.device = device
        # This process's place in a worker group whose ranks run every pipeline call together, or None.
        self.group = group
        self._follower = group is not None and not group.leader
        self.loaded: LoadedPipeline | None = None
        self.info: ModelInfo | None = None
        self.phases = StartupPhases()
        # The loaded pipeline (Task.GENERATE) and the edit pipelines made from it, with what each call takes.
        self._pipelines: dict[Task, Any] = {}
        self._accepted_by: dict[Task, set[str]] = {}
        self._tokenizer: Any = None
        self._gpu_jpeg = gpu_jpeg_encoder(device)
        self._graphs: Any = None
        # Whether the tier's step cache decides per step whether to reuse (warm-ups then run every step).
        self._step_cache = False
        # Per-request adapters (LoRA), where the server takes them.
        self.adapters: Any = None
        # Whether a group's ranks decode each batch's latents together (see `parallel.split_decode`).
        self._joint_decode = False
        # FLUX.1's text-encoder outputs by prompt (PROMPT_CACHE_MB), where the model encodes that way.
        self._prompt_cache: PromptCache | None = None
        # Set after a CUDA error that leaves the device unusable: the worker then exits and is replaced.
        self.broken = False
        # Told of each start-up phase as it begins, with its detail (the worker reports them to readiness).
        self.on_phase: Callable[[str, str], None] = lambda phase, detail: None

    @property
    def pipeline(self) -> Any:
        assert self.loaded is not None, "load() first"
        return self.loaded.pipeline

    def load(self) -> ModelInfo:
        """Join the group (a worker group's rank), load the model and accelerate it as its tier says."""
        c = self.config
        started = time.perf_counter()
        self.on_phase("importing", "torch, diffusers and the pipeline's modules")
        _prepare_process(self.device)
        # The pipeline's own modules (its text encoders' in transformers) before the weights, so the load
        # phase times reading weights alone.
        import_pipeline_class(c.model_path or c.model_repo)
        self.phases.import_s += time.perf_counter() - started
        if self.group is not None:
            from diffuserve.engine.parallel.group import join_group

            join_group(self.group, self.device)
        started = time.perf_counter()
        size = weights_bytes(c.model_path or c.model_repo) if c.weights != "random" else 0
        self.on_phase("loading", f"{size / 1e9:.1f} GB of weights to {self.device}" if size else "")
        tier_imports = start_preimport(tier_modules(c.tier, self.device))
        self.loaded = load_pipeline(
            c.model_repo, device=self.device, dtype_name=c.dtype, weights=c.weights, path=c.model_path
        )
        check_tier(self.loaded.family, c.tier)
        self.phases.load_s = time.perf_counter() - started
        early = self.loaded.early_read
        if early is not None:
            self.phases.early_read_s = early.seconds
            log.info(
                "weights: %.1f GB loaded in %.1f s, of which %.1f GB read beside the imports (%.1f s; the load "
                "waited %.1f s for it)",
                size / 1e9, self.phases.load_s, early.gigabytes, early.seconds, early.waited_s,
            )  # fmt: skip
        elif size:
            rate = size / 1e9 / max(self.phases.load_s, 1e-6)
            log.info("weights: %.1f GB loaded in %.1f s (%.1f GB/s)", size / 1e9, self.phases.load_s, rate)
        started = time.perf_counter()
        from diffuserve.engine.tiers import fp8_applies

        # The label must not promise a calibration that will not run (no fp8 here: no calibration).
        calibrating = c.fp8_rounding == Fp8Rounding.CALIBRATED and fp8_applies(
            self.loaded.pipeline, c.tier, self.device
        )
        # A first start with calibrated fp8 rounding runs the calibration calls here: say why it takes longer.
        self.on_phase("accelerating", f"tier {c.tier}" + (", fp8 rounding calibrated" if calibrating else ""))
        if tier_imports is not None:  # what the load did not hide is the tier's time
            tier_imports.join()
        parallel, pixels = self._accelerate(self.loaded)
        pipeline, family = self.loaded.pipeline, self.loaded.family
        # After the tier and the group: the edit pipelines share the (compiled, quantized, split) denoiser.
        self._pipelines = {Task.GENERATE: text_pipeline(pipeline, family), **edit_pipelines(pipeline, family)}
        self._accepted_by = {
            task: set(inspect.signature(p.__call__).parameters) for task, p in self._pipelines.items()
        }
        self._tokenizer = prompt_tokenizer(pipeline)
        text = self._pipelines[Task.GENERATE]
        if c.prompt_cache_bytes > 0 and takes_embeddings(text):
            self._prompt_cache = PromptCache(text, c.prompt_cache_bytes, family.max_sequence_length)
        edits = tuple(task for task in self._pipelines if task is not Task.GENERATE)
        accepted = self._accepted_by[Task.GENERATE]
        self.info = model_info(
            c, self.loaded.family, accepted, parallel=parallel, token_pixels=pixels, edit_tasks=edits
        )
        if self.adapters is not None:
            self.info.lora_max_rank = c.lora_max_rank
            self.info.lora_targets = self.adapters.targets  # those a layer hosts, as adapters name them
        self.phases.tier_s = time.perf_counter() - started
        return self.info

    def _accelerate(self, loaded: LoadedPipeline) -> tuple[int, int]:
        """The tier's recipe, then a group's split, then CUDA graphs around the (split) denoiser, then the AdaLN
        tables outside the graphs (their work runs before each replay). Returns the group's size and the pixels
        per token side."""
        from diffuserve.engine.parallel.context import parallelize, token_pixels
        from diffuserve.engine.tiers import apply_recipe, denoiser_of, recipe_for
        from diffuserve.engine.tiers.graphs import enable_cuda_graphs, graphs_wanted
        from diffuserve.engine.tiers.modulation import enable_step_modulation

        c, pipeline, family = self.config, loaded.pipeline, loaded.family
        recipe = recipe_for(c.tier)
        model = denoiser_of(pipeline)
        targets: dict[str, tuple[int, int]] = {}
        if c.lora_max_rank > 0 and model is not None:
            # Before the tier: fusing QKV empties the separate projections whose shapes adapters name.
            from diffuserve.engine.lora import lora_targets

            targets = lora_targets(model, family.blocks)
        calibrated = recipe.fp8 and c.fp8_rounding == Fp8Rounding.CALIBRATED
        calibration = (
            calibration_calls(text_pipeline(pipeline, family), family, c.max_batch) if calibrated else None
        )
        apply_recipe(
            pipeline,
            recipe,
            device=self.device,
            cache_dir=c.cache_dir,
            family=family,
            calibration=calibration,
        )
        if targets:
            self._install_adapters(model, targets)
        graphs, why = graphs_wanted(c.cuda_graphs, device=self.device, recipe=recipe, family=family)
        log.info(why)
        parallel, pixels = 1, token_pixels(pipeline)
        if self.group is not None:
            from diffuserve.engine.parallel.split_decode import split_vae_decode

            # After the tier: its attention processors (fused QKV) must be the ones that learn the group.
            parallel = self.group.world_size
            pixels, _ = parallelize(
                loaded, parallel, c.parallel_attention, graphs=graphs, timeout_s=self.group.timeout_s
            )
            whole = split_vae_decode(pipeline, parallel) if c.parallel_decode else "PARALLEL_DECODE is off"
            self._joint_decode = whole is None
            log.info(
                "VAE decode: %s",
                f"on the leader alone ({whole})" if whole else "split by rows across the group",
            )
        if graphs and model is not None:
            # After the group's split, so the graphs hold its collectives too.
            self._graphs = enable_cuda_graphs(model)
        if recipe.step_modulation and family.flux_hooks:
            enable_step_modulation(pipeline, c.max_batch)
        self._step_cache = recipe.step_cache is not None and family.flux_hooks
        return parallel, pixels

    def _install_adapters(self, model: Any, targets: dict[str, tuple[int, int]]) -> None:
        """After the tier (its fused and quantized layers carry the adapters), before compile first runs."""
        from diffuserve.engine.lora import EngineAdapters

        c = self.config
        self.adapters = EngineAdapters(
            model,
            targets,
            max_rank=c.lora_max_rank,
            slots=c.lora_slots or c.max_batch + 1,
            max_batch=c.max_batch,
            cache_bytes=c.lora_cache_bytes,
        )
        self.adapters.preload(c.lora_preload)

    def close(self) -> None:
        """Release the CUDA graphs, then leave the group: NCCL's teardown waits for ever on a communicator
        that a live CUDA graph still holds collectives of (seen with torch 2.11)."""
        if self._graphs is not None:
            self._graphs.release()
        if self.group is not None:
            from diffuserve.engine.parallel.group import leave_group

            leave_group()

    def save_compile_cache(self) -> str | None:
        """Persist what warm-up compiled; returns the file, or None where nothing was compiled (CPU) or the
        write failed (logged there, never fatal)."""
        from diffuserve.engine.tiers import save_compile_cache

        started = time.perf_counter()
        path = save_compile_cache(self.config.cache_dir)
        self.phases.compile_cache_save_s = time.perf_counter() - started
        return path

    def warmup_sizes(self) -> list[int]:
        """The batch sizes to warm, the one readiness waits for first. On a GPU compiled code and CUDA graphs are
        specialised per batch size: 1 first, so every request can be served once the worker is ready, then the
        largest and on down (the worker warms those between batches). On CPU nothing is specialised per size:
        the full batch alone loads what loads lazily."""
        assert self.info is not None
        top = self.info.max_batch
        return warm_order(top) if self.sizes_specialised else [top]

    @property
    def sizes_specialised(self) -> bool:
        """Whether each batch size runs its own compiled code (GPU): a size not warmed would compile in a request."""
        return self.device.startswith("cuda")

    def warm(self, size: int) -> DeviceBatch | None:
        """One warm-up batch of `size` images at the native size, timed into `phases`. It runs as few steps as
        prove the size: one compiles, a second captures where CUDA graphs are on; all the default steps where
        a step cache decides per step (its reuse path must have run too) and on CPU (as a request would).
        Returns its output (None on a group's follower)."""
        assert self.info is not None
        info = self.info
        started = time.perf_counter()
        steps = 2 if self._graphs is not None else 1
        if not self.sizes_specialised or self._step_cache:
            steps = max(info.default_steps, steps)
        # JPEG first: on a GPU the first warm-up (batch size 1) then loads the device's JPEG encoder too.
        formats = ["jpeg", "webp", "png"]
        items = [BatchItem("warmup", "warm-up", None, [i], formats[i % 3], None) for i in range(size)]
        job = BatchJob(-1, info.native_width, info.native_height, steps, info.default_guidance, items)
        computed = self.compute(job)
        if isinstance(computed, BatchResult):
            raise RuntimeError(f"warm-up at batch {size} failed: {computed.error}")
        self.phases.warmup_s[size] = time.perf_counter() - started
        self.phases.warmup_steps[size] = steps
        return None if self._follower else computed

    def warmup(self) -> DeviceBatch | None:
        """Every size of `warmup_sizes`; returns the first one's output (None on a group's follower)."""
        outputs = [self.warm(size) for size in self.warmup_sizes()]
        return outputs[0] if outputs else None

    def compute(
        self,
        job: BatchJob,
        cancelled: Callable[[], bool] | None = None,
        on_preview: Callable[[PreviewBatch], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> DeviceBatch | BatchResult:
        """The device's part of a batch; a failure comes back as a BatchResult with its error. `cancelled` is
        asked at every denoising step: once it says yes, the batch stops there. `on_preview` receives the
        previews of the items that asked for partial images, while the batch runs; `on_step` each finished
        denoising step, counted from 1."""
        assert self.loaded is not None
        started = time.perf_counter()
        marks = StepMarks(self.device.startswith("cuda"))
        try:
            pipeline = self._pipelines.get(job.task)
            if pipeline is None:
                raise RuntimeError(f"this model has no {job.task} pipeline")
            # A tensor on the device: converting to uint8 there is nearly free, and only 1/4 of the bytes of a
            # float32 copy (what diffusers' PIL output makes first) cross to the host. A group's follower shares
            # the denoiser's work, and the decode's where the ranks decode together; its images are the leader's.
            output_type = "latent" if self._follower and not self._joint_decode else "pt"
            accepted = self._accepted_by[job.task]
            kwargs = pipeline_kwargs(job, self.loaded.family, accepted, output_type)
            cache = self._prompt_cache
            # A negative prompt (true CFG) would need its own embeddings: such batches encode as usual.
            prompt_counts = (0, 0)
            if cache is not None and "negative_prompt" not in kwargs and accepted >= CALL_PARAMETERS:
                kwargs.update(cache.embeddings(kwargs.pop("prompt")))
                prompt_counts = cache.last
            adapters = self.adapters.prepare(job) if self.adapters is not None else None
            layout = self.loaded.family.previews
            previews = (
                None
                if on_preview is None or self._follower or layout is None
                else PreviewTaker(pipeline, job, on_preview, layout)
            )
            if "callback_on_step_end" in accepted:
                wanted = previews if previews is not None and previews.wanted else None
                kwargs["callback_on_step_end"] = step_callback(marks, cancelled, wanted, on_step)
            images = pipeline(**kwargs).images
            if len(images) != job.num_images:
                raise RuntimeError(f"pipeline returned {len(images)} images for {job.num_images} requested")
            if self._follower:
                return DeviceBatch(job, np.empty((0, 0, 0, 3), dtype=np.uint8), 0.0, 0.0)
            if job.task is Task.INPAINT and not isinstance(images, (list, np.ndarray)):
                images = keep_outside_mask(images, job)
            pixels, on_device = to_uint8(images)
            decode_ms = marks.since_last_step_ms()
            inference_ms = (time.perf_counter() - started) * 1000
            decode_ms = min(decode_ms, inference_ms)
            batch = DeviceBatch(job, pixels, inference_ms - decode_ms, decode_ms)
            batch.text_tokens = text_tokens(self._tokenizer, job, self.loaded.family.max_sequence_length)
            if adapters is not None:
                batch.adapter_loads, batch.adapter_hits = adapters.loaded, adapters.hits
            batch.prompt_hits, batch.prompt_misses = prompt_counts
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
            self.broken = self.group is not None or poisons_device(exc)
            release_cuda_memory()
            return BatchResult(batch_id=job.batch_id, error=describe_failure(exc))

    def _encode_on_device(self, batch: DeviceBatch, pixels: Any) -> None:
        """JPEGs straight from the device's uint8 tensor (nvJPEG), where this worker has it: a fraction of a
        millisecond each instead of several on a CPU core."""
        formats = batch.job.formats
        wanted = [i for i, (fmt, _) in enumerate(formats) if fmt == "jpeg"]
        if self._gpu_jpeg is None or not wanted:
            return
        started = time.perf_counter()
        batch.device_encoded = self._gpu_jpeg(pixels, wanted, [formats[i][1] for i in wanted])
        batch.device_encode_ms = (time.perf_counter() - started) * 1000


def _prepare_process(device: str) -> None:
    """This process's device, and quiet libraries: loading bars are for terminals, in a server log they are
    noise between the structured lines."""
    import threading

    import tqdm
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Even disabled, diffusers' progress bars create tqdm's multiprocessing lock, a named semaphore that a
    # killed worker can never remove (the resource tracker then warns of a leak). One process needs no more
    # than a thread lock.
    tqdm.tqdm.set_lock(threading.RLock())
