"""The p2p Ulysses exchange's layout: every rank's shares land where its peers' attention and next layer read
them (ranks emulated in one process with plain tensors as inboxes; the symmetric memory itself needs GPUs)."""

from __future__ import annotations

import pytest
import torch

from diffuserve.engine.copy_engine import copy_rows
from diffuserve.engine.ulysses_p2p import Share, attend, copy, head_chunks, send_output, send_qkv, wide


@pytest.mark.parametrize(("world", "chunks"), [(2, 1), (2, 2), (4, 2), (2, 3)])
def test_exchange_gives_each_rank_the_attention_of_its_tokens(world: int, chunks: int) -> None:
    torch.manual_seed(0)
    batch, tokens, heads, dim = 2, 24, 8, 16
    local_tokens, local_heads = tokens // world, heads // world
    query, key, value = (torch.randn(batch, tokens, heads, dim) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    ).transpose(1, 2)

    qkv_inboxes = [torch.full((3, batch, tokens, local_heads, dim), float("nan")) for _ in range(world)]
    out_inboxes = [torch.full((batch, local_tokens, heads, dim), float("nan")) for _ in range(world)]
    shares = [Share(rank=rank, world=world) for rank in range(world)]
    everyone = list(range(world))
    parts = head_chunks(local_heads, chunks)
    for share in shares:
        rows = share.tokens(share.rank, local_tokens)
        for chunk in parts:
            send_qkv(share, (query[:, rows], key[:, rows], value[:, rows]), qkv_inboxes, everyone, chunk)
    for share in shares:
        for chunk in parts:
            out = attend(qkv_inboxes[share.rank][:, :, :, chunk], None)
            send_output(share, out, out_inboxes, everyone, chunk)

    for share in shares:
        rows = share.tokens(share.rank, local_tokens)
        torch.testing.assert_close(out_inboxes[share.rank], expected[:, rows])


def test_head_chunks_split_evenly_or_not_at_all() -> None:
    assert head_chunks(12, 2) == [slice(0, 6), slice(6, 12)]
    assert head_chunks(12, 5) == [slice(0, 12)]
    assert head_chunks(12, 0) == [slice(0, 12)]


def test_shares_of_non_contiguous_inputs() -> None:
    # Q, K and V are often views of one fused projection: strided, not contiguous.
    batch, tokens, heads, dim, world = 1, 8, 4, 8, 2
    fused = torch.randn(batch, tokens // world, 3, heads, dim)
    qkv = tuple(fused[:, :, index] for index in range(3))
    inboxes = [torch.zeros(3, batch, tokens, heads // world, dim) for _ in range(world)]
    send_qkv(Share(rank=1, world=world), qkv, inboxes, [0, 1], slice(0, 2))
    for target, inbox in enumerate(inboxes):
        heads_of_target = slice(target * 2, target * 2 + 2)
        torch.testing.assert_close(inbox[:, :, 4:], torch.stack([x[:, :, heads_of_target] for x in qkv]))
        assert not inbox[:, :, :4].any()  # rank 0's place, untouched by rank 1


def test_copies_move_16_byte_elements_where_the_layout_allows() -> None:
    rows = torch.randn(4, 6, 128).to(torch.bfloat16)
    assert wide(rows[:, 2:4]).dtype == torch.complex128  # a head share: strided rows of whole 16-byte groups
    assert wide(rows[..., 1:9]).dtype == torch.bfloat16  # misaligned start: element by element
    target = torch.zeros(4, 2, 7, dtype=torch.bfloat16)
    copy(target, rows[:, 2:4, :7])  # odd width: the plain copy
    assert torch.equal(target, rows[:, 2:4, :7])
    target = torch.zeros(4, 2, 128, dtype=torch.bfloat16)
    copy(target, rows[:, 2:4])
    assert torch.equal(target, rows[:, 2:4])


def test_copy_engine_declines_cpu_tensors() -> None:
    source = torch.randn(1, 4, 2, 8)
    assert copy_rows(torch.empty_like(source), source) is False


def test_the_operator_traces_with_its_output_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        query = torch.empty(2, 16, 8, 4, dtype=torch.bfloat16)
        out = torch.ops.diffuserve.ulysses_p2p_attention(query, query, query, None)
    assert out.shape == query.shape and out.dtype == query.dtype and out.is_contiguous()


def test_a_calls_inboxes_fit_its_buffer_without_overlapping() -> None:
    import math

    from diffuserve.engine.ulysses_p2p import Exchange

    class Handle:  # symmetric memory's get_buffer over plain per-rank buffers
        def __init__(self, buffers: list[torch.Tensor]) -> None:
            self.buffers = buffers

        def get_buffer(
            self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int
        ) -> torch.Tensor:
            size = math.prod(shape)
            assert offset + size <= self.buffers[rank].numel()
            return self.buffers[rank][offset : offset + size].view(shape)

    query_shape = torch.Size((1, 6, 4, 8))
    exchange = Exchange.__new__(Exchange)
    exchange.dtype, exchange.capacity = torch.float32, 2 * query_shape.numel()  # a larger call's buffer
    exchange.share = Share(rank=0, world=2)
    exchange.handle = Handle([torch.zeros(4 * exchange.capacity) for _ in range(2)])
    qkv, out = exchange.inboxes(query_shape)
    assert [x.shape for x in qkv] == [torch.Size((3, 1, 12, 2, 8))] * 2
    assert [x.shape for x in out] == [query_shape] * 2
    for rank in range(2):
        qkv[rank].fill_(1.0)
        assert not out[rank].any()
