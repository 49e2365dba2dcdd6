"""ring-p2p's exchange and merge: each rank's attention over every rank's K and V, put together from its
partial attentions (ranks emulated in one process, with plain tensors as the symmetric buffers and a
stand-in for their signals; the symmetric memory itself needs GPUs)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from diffuserve.engine.parallel import merge as ring_merge
from diffuserve.engine.parallel.merge import merge
from diffuserve.engine.parallel.ring_p2p import ACK, DATA, RingExchange, install_ring_p2p, partial_attention


def full_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] in, [B, S, H, D] out, as the layer after the attention reads it."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value).transpose(1, 2)


class Signals:
    """Symmetric memory's signal pads for emulated ranks: a put waits for the slot to be free, a wait for it
    to be set (here a slot in the wrong state is an error instead of a wait: the order is the test)."""

    def __init__(self, world: int) -> None:
        self.pads = {
            (dst, channel, src): 0 for dst in range(world) for src in range(world) for channel in (0, 1)
        }
        self.log: list[tuple[str, int, int, int]] = []


class Handle:
    def __init__(self, rank: int, buffers: list[torch.Tensor], signals: Signals) -> None:
        self.rank, self.buffers, self.signals = rank, buffers, signals

    def get_buffer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int) -> torch.Tensor:
        size = math.prod(shape)
        assert offset + size <= self.buffers[rank].numel()
        return self.buffers[rank][offset : offset + size].view(shape)

    def put_signal(self, dst: int, channel: int, timeout_ms: int) -> None:
        slot = (dst, channel, self.rank)
        assert self.signals.pads[slot] == 0, f"rank {self.rank}: put {slot} not yet consumed"
        self.signals.pads[slot] = 1
        self.signals.log.append(("put", self.rank, dst, channel))

    def wait_signal(self, src: int, channel: int, timeout_ms: int) -> None:
        slot = (self.rank, channel, src)
        assert self.signals.pads[slot] == 1, f"rank {self.rank}: wait {slot} never signalled"
        self.signals.pads[slot] = 0
        self.signals.log.append(("wait", self.rank, src, channel))


def ring(world: int, capacity: int) -> tuple[list[RingExchange], Signals]:
    signals = Signals(world)
    buffers = [torch.full((world * 2 * capacity,), float("nan")) for _ in range(world)]
    exchanges = []
    for rank in range(world):
        exchange = RingExchange.__new__(RingExchange)
        exchange.dtype, exchange.capacity, exchange.world, exchange.rank = (
            torch.float32,
            capacity,
            world,
            rank,
        )
        exchange.handle = Handle(rank, buffers, signals)
        exchange.post_acks(1000)
        exchanges.append(exchange)
    return exchanges, signals


@pytest.mark.parametrize("world", [2, 3])
def test_partial_attentions_merge_into_the_attention_over_every_token(world: int) -> None:
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 4, 6 * world, 16) for _ in range(3))
    parts: list[torch.Tensor] = []
    for keys, values in zip(key.chunk(world, dim=2), value.chunk(world, dim=2), strict=True):
        parts += partial_attention(query, keys, values, None)
    torch.testing.assert_close(merge(parts), full_attention(query, key, value), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_attends_over_every_ranks_keys_twice_in_a_row(world: int) -> None:
    torch.manual_seed(1)
    batch, heads, local, dim = 1, 2, 5, 8
    exchanges, signals = ring(world, capacity=2 * batch * heads * local * dim)  # a larger call's buffer
    for _ in range(2):  # the second call reuses the inboxes: the ACKs must have come back
        query, key, value = (torch.randn(batch, heads, local * world, dim) for _ in range(3))
        expected = full_attention(query, key, value)
        shares = [
            tuple(x.chunk(world, dim=2)[rank].contiguous() for x in (query, key, value))
            for rank in range(world)
        ]
        inboxes = exchanges[0].inboxes(shares[0][1].shape)
        for exchange, (_, rank_key, rank_value) in zip(exchanges, shares, strict=True):
            exchange.send(rank_key, rank_value, inboxes, 1000)
        for rank, (exchange, (rank_query, rank_key, rank_value)) in enumerate(
            zip(exchanges, shares, strict=True)
        ):
            parts = [*partial_attention(rank_query, rank_key, rank_value, None)]
            parts += exchange.receive(rank_query, inboxes[rank], None, 1000)
            rows = slice(rank * local, (rank + 1) * local)
            torch.testing.assert_close(merge(parts), expected[:, rows], atol=1e-5, rtol=1e-4)
    # Every pair: each write waited for the peer's ACK, and each read for the peer's DATA.
    waits = [entry for entry in signals.log if entry[0] == "wait"]
    assert sorted({entry[3] for entry in waits}) == [ACK, DATA]
    assert len(waits) == 2 * 2 * world * (world - 1)


def test_a_rank_reads_the_peers_in_ring_order() -> None:
    exchanges, _ = ring(4, capacity=8)
    assert [exchange.peers() for exchange in exchanges] == [[1, 2, 3], [2, 3, 0], [3, 0, 1], [0, 1, 2]]


def test_the_operator_traces_with_the_merged_layout() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        query = torch.empty(2, 8, 16, 4, dtype=torch.bfloat16)
        out = torch.ops.diffuserve.ring_p2p_attention(query, query, query, None)
    assert out.shape == (2, 16, 8, 4) and out.dtype == torch.bfloat16


def test_diffusers_ring_is_overridden_once_by_a_subclass_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.models import attention_dispatch

    original = attention_dispatch.TemplatedRingAttention
    monkeypatch.setattr(attention_dispatch, "TemplatedRingAttention", original)
    group = SimpleNamespace(group_name="g")
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda _group: 2)
    install_ring_p2p(group, 1.0)
    installed = attention_dispatch.TemplatedRingAttention
    install_ring_p2p(group, 1.0)  # a second install keeps the one override
    assert attention_dispatch.TemplatedRingAttention is installed
    assert installed is not original and installed.__mro__[1] is original


@pytest.mark.parametrize(
    ("have_triton", "head_dim", "expected"),
    [(True, 128, True), (True, 64, True), (True, 96, False), (True, 8, False), (False, 128, False)],
)
def test_the_merge_kernel_takes_power_of_two_heads_where_triton_is(
    monkeypatch: pytest.MonkeyPatch, have_triton: bool, head_dim: int, expected: bool
) -> None:
    monkeypatch.setattr(ring_merge, "HAVE_TRITON", have_triton)
    assert ring_merge.mergeable(head_dim) is expected


def test_merge_pair_without_triton_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring_merge, "_kernel", lambda: None)
    parts = [torch.zeros(1, 2, 4, 16), torch.zeros(1, 2, 4)] * 2
    with pytest.raises(RuntimeError, match="Triton"):
        ring_merge.merge_pair(*parts)


def test_attention_the_ring_does_not_take_goes_to_diffusers_own_with_every_argument() -> None:
    from diffuserve.engine.parallel.ring_p2p import _ring_class

    seen: list[tuple] = []

    class DiffusersRing:
        @staticmethod
        def forward(ctx: object, *args: object) -> str:
            seen.append(args)
            return "diffusers"

    ring = _ring_class(DiffusersRing)
    query = torch.zeros(1, 4, 2, 8)  # on the CPU: not ring-p2p's
    rest = (None, 0.0, False, 0.5, False, False, "forward_op", "backward_op", "config")
    assert ring.forward(None, query, query, query, *rest) == "diffusers"
    assert seen == [(query, query, query, *rest)]
