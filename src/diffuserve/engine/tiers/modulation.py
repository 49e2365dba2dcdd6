"""FLUX's AdaLN modulation for all of a call's steps in one batched product per norm, looked up at each step:
a diffusers hook on the denoiser fills the call's tables, a torch forward hook on each norm's `linear` returns
the step's rows.

The modulation (each block's shift, scale and gate) depends only on the timestep, the guidance and the pooled
text embedding. At one row a product reads its whole weight for a few kilobytes: 77 such products a step for
FLUX.1-dev. Once the scheduler has set a call's timesteps, one product per norm over every step reads each
weight once per call (docs/design/modulation.md). A call is told apart by the scheduler's timesteps tensor and
the pooled embedding it passes, the step by the scheduler's step index. A second denoiser call in a step (true
CFG), a step the table lacks, and a call whose given timestep is not the table's (checked once per call) get
their rows computed for themselves: the lookup never serves another call's modulation.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from diffuserve.engine.tiers.graphs import HOOK_NAME as GRAPHS_HOOK
from diffuserve.engine.tiers.graphs import CapturedCall

log = logging.getLogger(__name__)

TABLES_HOOK = "diffuserve_step_modulation"
# The buffer on each norm's linear that holds the current step's rows.
ROWS_BUFFER = "step_modulation_rows"
# Steps a table holds at first; a call with more steps grows it. Captured fills kept, oldest dropped first.
MIN_STEPS, MAX_FILL_GRAPHS = 32, 16


class StepRows:
    """On a norm's `linear`: its output is replaced by `current`, the step's rows the denoiser's hook put there.

    A torch forward hook (one module-level function for every norm) and a buffer, not a diffusers hook: diffusers
    gives each hooked module its own `functools.partial` forward, and dynamo guards on that object's identity,
    so the regionally compiled blocks recompiled once per block instance (57 for FLUX.1, past the recompile
    limit). Compiled, the linear's now unused product is dead code and is dropped from the graph."""

    def __init__(self, linear: nn.Linear) -> None:
        self.linear = linear
        # A quantized weight (torchao's fp8 tensors) reports the dtype its products return in.
        dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
        linear.register_buffer(
            ROWS_BUFFER,
            torch.zeros(0, linear.out_features, device=linear.weight.device, dtype=dtype),
            persistent=False,
        )
        self.handle = linear.register_forward_hook(_looked_up)
        self.table = self.current.new_empty(0, 0, linear.out_features)

    @property
    def current(self) -> torch.Tensor:
        rows: torch.Tensor = getattr(self.linear, ROWS_BUFFER)
        return rows

    @current.setter
    def current(self, rows: torch.Tensor) -> None:
        setattr(self.linear, ROWS_BUFFER, rows)

    def compute(self, embedding: torch.Tensor) -> torch.Tensor:
        """The product itself, as the norm computes it: linear(silu(embedding)) (`forward` skips the hook)."""
        return self.linear.forward(nn.functional.silu(embedding))  # type: ignore[no-any-return]


def _looked_up(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    rows: torch.Tensor = getattr(module, ROWS_BUFFER)
    return rows[: args[0].shape[0]]


def norm_linears(model: nn.Module) -> list[nn.Linear] | None:
    """The modulation products of a FLUX transformer (each double block's two norms, each single block's norm,
    the output norm), or None for a denoiser without FLUX's layout."""
    if not hasattr(model, "time_text_embed"):
        return None
    try:
        norms = [n for b in model.transformer_blocks for n in (b.norm1, b.norm1_context)]  # type: ignore
        norms += [b.norm for b in model.single_transformer_blocks] + [model.norm_out]  # type: ignore
    except AttributeError:
        return None
    linears = [getattr(n, "linear", None) for n in norms]
    return linears if all(isinstance(x, nn.Linear) for x in linears) else None  # type: ignore[return-value]


class StepModulation(ModelHook):  # type: ignore[misc]
    """On the denoiser, outside any CUDA graph hook: fills every norm's table for all of a call's steps at its
    first step (a captured graph itself on CUDA, after the first fill of a shape: in eager mode its 77 quantized
    products' Python kept the GPU waiting), and copies the step's rows in before each denoiser call."""

    def __init__(self, model: nn.Module, rows: list[StepRows], scheduler: Any) -> None:
        super().__init__()
        self.model, self.rows, self.scheduler = model, rows, scheduler
        self.signature = inspect.signature(type(model).forward)
        # The call the tables hold: its timesteps tensor and pooled embedding (the objects), its timesteps as
        # the pipeline passes them, whether the given one matched, and the steps already served.
        self._timesteps: Any = None
        self._pooled: Any = None
        self._given: torch.Tensor | None = None
        self._valid: bool | None = None
        self._served: set[int] = set()
        self._fills: dict[tuple, CapturedCall] = {}
        self._fills_off: str | None = None
        self._pool: Any = None
        self.lookups = self.computed = 0

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict[str, Any]]:
        call = self.signature.bind_partial(module, *args, **kwargs).arguments
        with torch.no_grad():
            self._prepare(call)
        return args, kwargs

    def _prepare(self, call: dict[str, Any]) -> None:
        pooled = call["pooled_projections"]
        batch = pooled.shape[0]
        self._fit(batch)
        timesteps, step = getattr(self.scheduler, "timesteps", None), self.scheduler.step_index
        if timesteps is not None and timesteps is not self._timesteps and step is None:
            self._fill(call, timesteps)  # a pipeline call starts: its first denoiser call's values
        index = int(step if step is not None else self.scheduler.begin_index or 0)
        ours = timesteps is self._timesteps and pooled is self._pooled and self._given is not None
        if ours and index < len(self._given) and index not in self._served:  # type: ignore[arg-type]
            if self._valid is None:
                self._valid = self._matches(call, index)
            if self._valid:
                currents = [rows.current[:batch] for rows in self.rows]
                torch._foreach_copy_(currents, [rows.table[index, :batch] for rows in self.rows])
                self._served.add(index)
                self.lookups += 1
                return
        embedding = self._embedding(
            call["timestep"], call.get("guidance"), pooled, call["hidden_states"].dtype
        )
        for rows in self.rows:
            rows.current[:batch].copy_(rows.compute(embedding))
        self.computed += 1

    def _fit(self, batch: int) -> None:
        """`current` holds at least `batch` rows. Growing it re-traces the compiled blocks and drops captured
        graphs (their addresses moved): the engine sizes it for its largest batch before the first call."""
        held = self.rows[0].current.shape[0]
        if batch <= held:
            return
        for rows in self.rows:
            rows.current = rows.current.new_zeros(batch, rows.current.shape[1])
        graphs = HookRegistry.check_if_exists_or_initialize(self.model).get_hook(GRAPHS_HOOK)
        if held and graphs is not None:
            graphs.release()

    def _fill(self, call: dict[str, Any], timesteps: torch.Tensor) -> None:
        timestep, pooled, guidance = call["timestep"], call["pooled_projections"], call.get("guidance")
        batch, steps = pooled.shape[0], len(timesteps)
        # The pipeline passes each step's timestep as t.expand(batch).to(latents' dtype) / 1000.
        given = timesteps.to(device=timestep.device, dtype=timestep.dtype) / 1000
        if self.rows[0].table.shape[0] < steps or self.rows[0].table.shape[1] < batch:
            for rows in self.rows:
                rows.table = rows.current.new_empty(max(MIN_STEPS, steps), *rows.current.shape)
            # They write into the tables they were captured with; their pool goes with them (a pool whose
            # graphs are all freed cannot take new captures).
            self._fills.clear()
            self._pool = None
        # Every row of the table, the last step repeated past the call's own: one fill shape (and one graph)
        # per batch size serves every step count, so warm-up captures them all.
        capacity = self.rows[0].table.shape[0]
        padded = torch.cat([given, given[-1:].expand(capacity - steps)])
        inputs = (padded, guidance, pooled, call["hidden_states"].dtype, capacity, batch)
        key = (capacity, padded.dtype, None if guidance is None else guidance.dtype, pooled.shape)
        self._run_fill(inputs, key, padded.is_cuda)
        self._timesteps, self._pooled, self._given = timesteps, pooled, given
        self._valid, self._served = None, set()

    def _run_fill(self, inputs: tuple, key: tuple, cuda: bool) -> None:
        captured = self._fills.get(key)
        if captured is not None:
            captured(inputs, {})
            return
        # A new shape runs eagerly first (what is set up lazily is, never inside a capture), then is captured.
        self._write_tables(*inputs)
        if not cuda or self._fills_off or torch.cuda.is_current_stream_capturing():
            return
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        try:
            self._fills[key] = CapturedCall(self._write_tables, inputs, {}, self._pool)
        except Exception as exc:  # a product that syncs: the fill stays eager
            self._fills_off = f"{type(exc).__name__}: {exc}"
            log.warning("AdaLN tables: the fill runs without a CUDA graph (%s)", self._fills_off)
        while len(self._fills) > MAX_FILL_GRAPHS:
            self._fills.pop(next(iter(self._fills)))

    def _write_tables(
        self,
        given: torch.Tensor,
        guidance: Any,
        pooled: torch.Tensor,
        dtype: torch.dtype,
        steps: int,
        batch: int,
    ) -> None:
        guidance = None if guidance is None else guidance.repeat(steps)
        embedding = self._embedding(given.repeat_interleave(batch), guidance, pooled.repeat(steps, 1), dtype)
        for rows in self.rows:
            rows.table[:steps, :batch].copy_(rows.compute(embedding).view(steps, batch, -1))

    def _matches(self, call: dict[str, Any], index: int) -> bool:
        """Whether the table's timestep of this step is bit for bit the one given (one sync per call)."""
        assert self._given is not None
        matches = bool(torch.equal(self._given[index].expand_as(call["timestep"]), call["timestep"]))
        if not matches:
            log.warning(
                "AdaLN tables: this pipeline passes timesteps otherwise; computed at each step instead"
            )
        return matches

    def _embedding(
        self, timestep: torch.Tensor, guidance: Any, pooled: torch.Tensor, dtype: Any
    ) -> torch.Tensor:
        """The conditioning embedding exactly as FluxTransformer2DModel.forward makes it from its arguments."""
        embed: Any = self.model.time_text_embed
        if guidance is None:
            return embed(timestep.to(dtype) * 1000, pooled)  # type: ignore[no-any-return]
        return embed(timestep.to(dtype) * 1000, guidance.to(dtype) * 1000, pooled)  # type: ignore[no-any-return]


def enable_step_modulation(pipeline: Any, batch: int = 1) -> StepModulation | None:
    """The tables on the pipeline's FLUX transformer (None for any other denoiser), their rows sized for
    `batch` (the largest batch served) at once: warm-up runs batch size 1 first, and a buffer grown later would
    re-trace the compiled blocks for every size already warm. Install it after the CUDA graph hook: its work
    runs before each replay. Pipelines made from this one (diffusers' from_pipe) share its scheduler, which
    the tables follow."""
    model, scheduler = getattr(pipeline, "transformer", None), getattr(pipeline, "scheduler", None)
    linears = norm_linears(model) if model is not None else None
    if model is None or linears is None or not hasattr(scheduler, "step_index"):
        return None
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if isinstance(existing := registry.get_hook(TABLES_HOOK), StepModulation):
        return existing
    rows = [StepRows(linear) for linear in linears]
    tables = StepModulation(model, rows, scheduler)
    tables._fit(batch)
    registry.register_hook(tables, TABLES_HOOK)
    log.info("AdaLN tables: %d modulation products computed once per call, looked up per step", len(linears))
    return tables
