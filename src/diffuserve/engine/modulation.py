"""A FLUX denoiser's AdaLN modulation for all of a call's steps in one batched product per norm, looked up at
each step (installed by the tiers S-XL as a forward pre-hook of the denoiser)."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from torch import nn

log = logging.getLogger(__name__)

# Where the denoiser keeps its tables (so a second install finds them).
ATTRIBUTE = "_diffuserve_step_modulation"
# Steps a table holds at first; a call with more steps grows it (it is read outside compiled code and graphs).
MIN_STEPS = 32
# Captured fills kept at once (one per batch size and table size), the oldest dropped first.
MAX_FILL_GRAPHS = 16


class StepLinear(nn.Linear):
    """An AdaLN norm's `linear` whose output for the current step is already in `current` (put there by
    `StepModulation` before the forward): the one-row product each step made is gone from the forward, the
    compiled blocks and the CUDA graphs. Its parameters stay where they were, so state dicts are unchanged."""

    current: torch.Tensor
    table: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.current[: input.shape[0]]

    def compute(self, embedding: torch.Tensor) -> torch.Tensor:
        """The product itself, as the norm computes it: linear(silu(embedding))."""
        return nn.Linear.forward(self, nn.functional.silu(embedding))


def norm_linears(model: nn.Module) -> list[nn.Linear] | None:
    """The modulation products of a FLUX transformer (each double block's two norms, each single block's norm,
    the output norm), or None for a denoiser without FLUX's layout."""
    blocks = getattr(model, "transformer_blocks", None)
    singles = getattr(model, "single_transformer_blocks", None)
    norm_out = getattr(model, "norm_out", None)
    if blocks is None or singles is None or norm_out is None or not hasattr(model, "time_text_embed"):
        return None
    norms = [n for b in blocks for n in (getattr(b, "norm1", None), getattr(b, "norm1_context", None))]
    norms += [getattr(b, "norm", None) for b in singles] + [norm_out]
    linears = [getattr(n, "linear", None) for n in norms]
    if not linears or not all(isinstance(x, nn.Linear) for x in linears):
        return None
    return linears  # type: ignore[return-value]


class StepModulation:
    """Fills every norm's table for all of a call's steps at its first step and copies the current step's rows
    in before each denoiser call (a forward pre-hook of the denoiser: PyTorch runs it before the forward that
    diffusers' hooks wrap, so before a CUDA graph replays it, whatever the order those were installed in).

    FLUX's modulation (each block's shift, scale and gate) depends only on the timestep, the guidance and the
    pooled text embedding. At one row a product reads its whole weight to make a few kilobytes: 77 such
    products a step for FLUX.1-dev (3.2 GB of fp8 weights), ≈ 1.6 ms of an H200's kernels a step, on one GPU as
    on every rank of a group. Once the scheduler has set a call's timesteps they are all known: one product per norm
    over every step's row reads each weight once per call.

    A call is told apart by the scheduler's timesteps (a new tensor whenever a pipeline sets them) and the
    pooled embedding it passes; the step by the scheduler's step index. A second denoiser call in a step (true
    CFG's negative prompt), a step the table does not hold, and every step of a call whose given timestep is
    not the table's (a pipeline that converts timesteps otherwise; checked once per call) get their rows
    computed for that call alone: the lookup never serves another call's modulation."""

    def __init__(self, model: nn.Module, linears: list[StepLinear], scheduler: Any) -> None:
        self.linears = linears
        self.scheduler = scheduler
        self.signature = inspect.signature(type(model).forward)
        # The call whose rows the tables hold: its timesteps tensor and pooled embedding (the objects), the
        # timesteps as the pipeline passes them, and whether the first of those matched the given one.
        self._timesteps: Any = None
        self._pooled: Any = None
        self._given: torch.Tensor | None = None
        self._valid: bool | None = None
        # Steps of this call whose rows were copied in already: a second denoiser call there is computed.
        self._served: set[int] = set()
        # The fill's CUDA graphs, per (table rows, dtypes, pooled shape); why they are off, if they are.
        self._fill_graphs: dict[tuple, Any] = {}
        self.fill_graphs_off: str | None = None
        self._pool: Any = None
        self.lookups = 0
        self.computed = 0

    @property
    def captured_fills(self) -> int:
        """How many fills are held as CUDA graphs."""
        return len(self._fill_graphs)

    def pre_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        call = self.signature.bind_partial(model, *args, **kwargs).arguments
        with torch.no_grad():
            self.prepare(model, call)

    def prepare(self, model: nn.Module, call: dict[str, Any]) -> None:
        pooled = call["pooled_projections"]
        batch = pooled.shape[0]
        self._fit(batch, model)
        timesteps = getattr(self.scheduler, "timesteps", None)
        if timesteps is not self._timesteps and timesteps is not None and self.scheduler.step_index is None:
            self._fill(model, call, timesteps)  # a pipeline call starts: its first denoiser call's values
        ours = timesteps is self._timesteps and pooled is self._pooled
        index = self._step_index()
        if ours and self._given is not None and index < len(self._given) and index not in self._served:
            if self._valid is None:
                self._valid = self._rows_match(call, index)
            if self._valid:
                self._copy_rows(index, batch)
                self._served.add(index)
                return
        self._compute_rows(model, call)

    def _step_index(self) -> int:
        step = self.scheduler.step_index
        if step is None:
            step = self.scheduler.begin_index or 0
        return int(step)

    def _fit(self, batch: int, model: nn.Module) -> None:
        """Every norm's `current` holds at least `batch` rows. Growing after compilation re-traces the blocks
        (their input's shape changed) and drops captured graphs (their addresses did): warm-up runs the largest
        batch first, so a server grows them once, before either."""
        held = self.linears[0].current.shape[0] if self.linears[0].current.dim() == 2 else 0
        if batch <= held:
            return
        for linear in self.linears:
            device = linear.current.device
            linear.current = torch.zeros(batch, linear.out_features, device=device, dtype=_dtype_of(linear))
        if held:
            from diffuserve.engine.graphs import HOOK_NAME as GRAPHS

            graphs = HookRegistry.check_if_exists_or_initialize(model).get_hook(GRAPHS)
            if graphs is not None:
                graphs.release()

    def _fill(self, model: nn.Module, call: dict[str, Any], timesteps: torch.Tensor) -> None:
        """Every norm's rows for every step of the call that starts, from the values this call was given. On a
        GPU the products run as a CUDA graph after the first call of a shape: in eager mode their Python (77
        quantized products) kept the GPU waiting longer than the per-step products took."""
        timestep, pooled = call["timestep"], call["pooled_projections"]
        batch, steps = pooled.shape[0], len(timesteps)
        # The pipeline passes each step's timestep as t.expand(batch).to(latents' dtype) / 1000.
        given = timesteps.to(device=timestep.device, dtype=timestep.dtype) / 1000
        self._ensure_tables(steps, batch)
        # Every row of the table, the last step repeated past the call's own: one fill shape (and one graph)
        # per batch size serves every step count the table holds, so warm-up captures them all.
        capacity = self.linears[0].table.shape[0]
        padded = torch.cat([given, given[-1:].expand(capacity - steps)])
        guidance = call.get("guidance")
        inputs = (model, padded, guidance, pooled, call["hidden_states"].dtype, capacity, batch)
        # The table's rows and the pooled embedding's shape (its batch) make the fill's shape.
        key = (capacity, padded.dtype, None if guidance is None else guidance.dtype, pooled.shape)
        self._run_fill(inputs, key, padded.is_cuda)
        self._timesteps, self._pooled, self._given = timesteps, pooled, given
        self._valid = None
        self._served = set()

    def _ensure_tables(self, steps: int, batch: int) -> None:
        first = self.linears[0]
        table = getattr(first, "table", None)
        if table is not None and table.shape[0] >= steps and table.shape[1] >= batch:
            return
        for linear in self.linears:
            shape = (max(MIN_STEPS, steps), linear.current.shape[0], linear.out_features)
            linear.table = torch.empty(shape, device=linear.current.device, dtype=linear.current.dtype)
        self._fill_graphs.clear()  # they write into the tables they were captured with

    def _run_fill(self, inputs: tuple, key: tuple, cuda: bool) -> None:
        """`_write_tables(*inputs)`, replayed from the CUDA graph captured for `key` where there is one."""
        from diffuserve.engine.graphs import CapturedCall

        if not cuda or self.fill_graphs_off or torch.cuda.is_current_stream_capturing():
            self._write_tables(*inputs)
            return
        captured = self._fill_graphs.get(key)
        if captured is not None:
            captured(inputs, {})
            return
        # A new shape: run it eagerly (what is set up lazily, never inside a capture, is set up here and the
        # tables are filled), then capture it; a capture records kernels without running them.
        self._write_tables(*inputs)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            self._fill_graphs[key] = CapturedCall(self._write_tables, inputs, {}, self._pool)
        except Exception as exc:  # a product that syncs: the fill stays eager
            self.fill_graphs_off = f"{type(exc).__name__}: {exc}"
            log.warning("AdaLN tables: the fill runs without a CUDA graph (%s)", self.fill_graphs_off)
            return
        while len(self._fill_graphs) > MAX_FILL_GRAPHS:
            self._fill_graphs.pop(next(iter(self._fill_graphs)))

    def _write_tables(
        self,
        model: nn.Module,
        given: torch.Tensor,
        guidance: torch.Tensor | None,
        pooled: torch.Tensor,
        dtype: torch.dtype,
        steps: int,
        batch: int,
    ) -> None:
        embedding = _embedding(
            model,
            given.repeat_interleave(batch),
            None if guidance is None else guidance.repeat(steps),
            pooled.repeat(steps, 1),
            dtype,
        )
        for linear in self.linears:
            linear.table[:steps, :batch].copy_(linear.compute(embedding).view(steps, batch, -1))

    def _rows_match(self, call: dict[str, Any], index: int) -> bool:
        """Whether the table's timestep of this step is bit for bit the one the call was given (one device sync
        per call of the pipeline)."""
        assert self._given is not None
        given = call["timestep"]
        matches = bool(torch.equal(self._given[index].expand_as(given), given))
        if not matches:
            log.warning(
                "AdaLN tables: this pipeline passes timesteps otherwise; computed at each step instead"
            )
        return matches

    def _copy_rows(self, index: int, batch: int) -> None:
        currents = [linear.current[:batch] for linear in self.linears]
        torch._foreach_copy_(currents, [linear.table[index, :batch] for linear in self.linears])
        self.lookups += 1

    def _compute_rows(self, model: nn.Module, call: dict[str, Any]) -> None:
        guidance = call.get("guidance")
        embedding = _embedding(
            model, call["timestep"], guidance, call["pooled_projections"], call["hidden_states"].dtype
        )
        batch = embedding.shape[0]
        for linear in self.linears:
            linear.current[:batch].copy_(linear.compute(embedding))
        self.computed += 1


def _dtype_of(linear: nn.Linear) -> torch.dtype:
    # A quantized weight (torchao's fp8 tensors) reports the dtype its products return in.
    return linear.bias.dtype if linear.bias is not None else linear.weight.dtype


def _embedding(
    model: nn.Module,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None,
    pooled: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The conditioning embedding exactly as FluxTransformer2DModel.forward makes it from its arguments."""
    timestep = timestep.to(dtype) * 1000
    embed: Any = model.time_text_embed
    if guidance is None:
        return embed(timestep, pooled)  # type: ignore[no-any-return]
    return embed(timestep, guidance.to(dtype) * 1000, pooled)  # type: ignore[no-any-return]


def enable_step_modulation(pipeline: Any, notes: list[str]) -> StepModulation | None:
    """Install the tables on the pipeline's FLUX transformer (any other denoiser is left as it is). Pipelines
    made from this one (diffusers' from_pipe) share its scheduler, which the tables follow."""
    model = getattr(pipeline, "transformer", None)
    scheduler = getattr(pipeline, "scheduler", None)
    linears = norm_linears(model) if model is not None else None
    if model is None or linears is None or scheduler is None or not hasattr(scheduler, "step_index"):
        notes.append("AdaLN tables: skipped, the denoiser has no FLUX-style modulation")
        return None
    existing = getattr(model, ATTRIBUTE, None)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    for linear in linears:
        linear.__class__ = StepLinear
        linear.register_buffer("current", torch.empty(0, device=linear.weight.device), persistent=False)
    tables = StepModulation(model, linears, scheduler)  # type: ignore[arg-type]
    model.register_forward_pre_hook(tables.pre_forward, with_kwargs=True)
    setattr(model, ATTRIBUTE, tables)
    notes.append(
        f"AdaLN tables: {len(linears)} modulation products computed once per call, looked up per step"
    )
    return tables
