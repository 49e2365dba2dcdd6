"""Adapters applied per image row of a batch, under compile and CUDA graphs: every adapted layer holds a few
slots of adapter weights in fixed buffers, and a row index says which slot each image of the batch uses.

Changing adapters only copies weights into a slot and indices into the row buffer, so the compiled graphs
(and captured CUDA graphs) stay valid: no recompile, no re-capture. Slot 0 stays zero: a row without adapter.
A slot holds an adapter set (one request's list with its scales) as one LoRA: the adapters' A matrices
stacked along the rank, their B matrices side by side, each scaled, which sums their products exactly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from diffuserve.engine.lora.targets import Host
from diffuserve.engine.lora.weights import LoadedAdapter

log = logging.getLogger(__name__)

# A request's adapters and their scales, the key of a slot's contents.
AdapterSet = tuple[tuple[str, float], ...]


class RowLora(nn.Module):
    """The per-row LoRA product of one host layer: out += Bᵢ(Aᵢ x) with i the slot of x's batch row."""

    down: torch.Tensor
    rows: torch.Tensor

    def __init__(self, host: Host, slots: int, rank: int, rows: torch.Tensor) -> None:
        super().__init__()
        weight = host.module.weight
        # fp8 tiers hold the weight as a quantized tensor; the adapter runs in the activations' dtype.
        dtype = getattr(weight, "dtype", torch.bfloat16)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            dtype = torch.bfloat16
        device = weight.device
        self.parts = host.parts
        self.rank = rank
        self.outs = _part_outputs(host)
        self.register_buffer(
            "down", torch.zeros(slots, rank * len(self.parts), host.module.in_features, dtype=dtype, device=device),
            persistent=False,
        )  # fmt: skip
        for i, out in enumerate(self.outs):
            self.register_buffer(
                f"up{i}", torch.zeros(slots, out, rank, dtype=dtype, device=device), persistent=False
            )
        self.register_buffer("rows", rows, persistent=False)

    def ups(self) -> list[torch.Tensor]:
        ups: list[torch.Tensor] = [getattr(self, f"up{i}") for i in range(len(self.outs))]
        return ups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        slots = self.rows[:n]
        flat = x.reshape(n, -1, x.shape[-1]).to(self.down.dtype)
        hidden = torch.bmm(flat, self.down[slots].transpose(1, 2))
        if len(self.outs) == 1:
            delta = torch.bmm(hidden, self.ups()[0][slots].transpose(1, 2))
        else:
            r = self.rank
            delta = torch.cat(
                [
                    torch.bmm(hidden[..., i * r : (i + 1) * r], up[slots].transpose(1, 2))
                    for i, up in enumerate(self.ups())
                ],
                dim=-1,
            )
        return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _add_lora(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    lora = module.lora
    assert isinstance(lora, RowLora)
    return output + lora(args[0]).to(output.dtype)


def _part_outputs(host: Host) -> list[int]:
    """Each part's output width: a fused projection splits its output evenly (Q, K and V are equal)."""
    out = host.module.out_features
    return [out // len(host.parts)] * len(host.parts)


@dataclass
class SlotTable:
    """Which adapter set each slot holds, least recently used first; slot 0 is the empty set for ever."""

    count: int
    held: OrderedDict[int, AdapterSet] = field(default_factory=OrderedDict)

    def find(self, adapters: AdapterSet) -> int | None:
        for slot, key in self.held.items():
            if key == adapters:
                self.held.move_to_end(slot)
                return slot
        return None

    def claim(self, adapters: AdapterSet, busy: set[int]) -> int:
        """A slot for `adapters`: a free one, else the least recently used one this batch does not use."""
        free = [slot for slot in range(1, self.count) if slot not in self.held]
        if free:
            slot = free[0]
        else:
            slot = next(s for s in self.held if s not in busy)
            del self.held[slot]
        self.held[slot] = adapters
        return slot


class LoraSlots:
    """Installs a RowLora on every host layer and fills the slots a batch needs. Not thread-safe."""

    def __init__(self, host_layers: list[Host], slots: int, rank: int, max_rows: int) -> None:
        if slots < 2:
            raise ValueError(f"LoRA needs at least 2 slots (one empty), got {slots}")
        device = host_layers[0].module.weight.device if host_layers else torch.device("cpu")
        # Row i of a call's batch uses slot rows[i]; a pipeline that doubles its batch for guidance repeats
        # the images, so the buffer repeats each batch's indices to its end (see `place`).
        self.rows = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.rank = rank
        self.table = SlotTable(slots)
        self.layers: dict[str, RowLora] = {}
        self._part_of: dict[str, tuple[RowLora, int]] = {}
        for host in host_layers:
            lora = RowLora(host, slots, rank, self.rows)
            host.module.lora = lora
            host.module.register_forward_hook(_add_lora)
            self.layers[host.name] = lora
            for index, part in enumerate(host.parts):
                self._part_of[part] = (lora, index)

    @property
    def nbytes(self) -> int:
        return (
            sum(b.numel() * b.element_size() for lora in self.layers.values() for b in lora.buffers())
            - len(self.layers) * self.rows.numel() * self.rows.element_size()
        )

    def place(self, per_image: list[AdapterSet], loaded: dict[str, LoadedAdapter]) -> int:
        """Point each image row at a slot holding its adapter set, writing the sets no slot holds yet.
        `loaded`: every adapter the sets name. Returns how many slots were written."""
        wanted = [key for key in dict.fromkeys(per_image) if key]
        if len(wanted) > self.table.count - 1:
            raise ValueError(
                f"{len(wanted)} adapter sets in one batch, more than the {self.table.count - 1} slots"
            )
        indices: dict[AdapterSet, int] = {(): 0}
        missing = []
        for adapters in wanted:
            slot = self.table.find(adapters)
            if slot is None:
                missing.append(adapters)
            else:
                indices[adapters] = slot
        for adapters in missing:
            self._check_fits(adapters, loaded)
        busy = set(indices.values())
        for adapters in missing:
            slot = self.table.claim(adapters, busy)
            try:
                self._write(slot, adapters, loaded)
            except BaseException:
                del self.table.held[slot]  # half written: no set may be found there
                raise
            busy.add(slot)
            indices[adapters] = slot
        pattern = torch.tensor([indices[key] for key in per_image], dtype=torch.long)
        repeats = -(-self.rows.numel() // max(1, len(per_image)))
        self.rows.copy_(pattern.repeat(repeats)[: self.rows.numel()], non_blocking=True)
        return len(missing)

    @property
    def parts(self) -> set[str]:
        """The adaptable layers as adapters name them (before fusing), each hosted here."""
        return set(self._part_of)

    def _check_fits(self, adapters: AdapterSet, loaded: dict[str, LoadedAdapter]) -> None:
        """A set's adapters fit the slots: layers hosted here, ranks adding up to at most the slots' rank."""
        ranks: dict[str, int] = {}
        for name, _ in adapters:
            for module, (down, _up) in loaded[name].modules.items():
                if module not in self._part_of:
                    raise ValueError(f"an adapter changes {module!r}, which no layer of this model hosts")
                ranks[module] = ranks.get(module, 0) + down.shape[0]
                if ranks[module] > self.rank:
                    raise ValueError(
                        f"the adapters' ranks add up to {ranks[module]} in {module!r}, above {self.rank}"
                    )

    def _write(self, slot: int, adapters: AdapterSet, loaded: dict[str, LoadedAdapter]) -> None:
        """The set's A matrices stacked along the rank of each part, its B matrices beside them times the
        client's scale (the file's alpha/rank is already in them); the rest of the slot zero."""
        zeros = [b[slot] for lora in self.layers.values() for b in (lora.down, *lora.ups())]
        torch._foreach_zero_(zeros)
        offsets: dict[str, int] = {}
        for name, scale in adapters:
            adapter = loaded[name]
            targets, sources, ups, up_sources = [], [], [], []
            for module, (down, up) in adapter.modules.items():
                lora, part = self._part_of[module]
                start = offsets.get(module, 0)
                r = down.shape[0]
                offsets[module] = start + r
                row = part * lora.rank + start
                targets.append(lora.down[slot, row : row + r])
                sources.append(down)
                ups.append(lora.ups()[part][slot, :, start : start + r])
                up_sources.append(up)
            torch._foreach_copy_(targets, sources)
            torch._foreach_copy_(ups, up_sources)
            if scale != 1.0:
                torch._foreach_mul_(ups, scale)
