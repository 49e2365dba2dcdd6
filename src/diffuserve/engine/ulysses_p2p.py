"""Ulysses attention whose exchanges are direct writes into the peers' GPU memory (PyTorch's symmetric memory,
over NVLink) instead of NCCL all-to-alls: each rank writes its Q, K and V shares straight into the layout the
peer's attention reads, and the attention's output straight into the layout the peer's next layer reads, so
the re-layout kernels around an all-to-all go away with the collective (PARALLEL_ATTENTION=ulysses-p2p)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffuserve.engine.copy_engine import copy_rows
from diffuserve.engine.dispatch_override import ULYSSES, install_override
from diffuserve.engine.symmetric import ExchangeCache, rendezvous

OP_NAME = "diffuserve::ulysses_p2p_attention"
# This process's exchange state, set by install_p2p.
_INSTALLED: dict[str, Any] = {}


@dataclass(frozen=True)
class Share:
    """One rank's place in the exchange: its rank and the group's size."""

    rank: int
    world: int

    def tokens(self, source: int, local_tokens: int) -> slice:
        """Where the tokens of rank `source` sit in the whole (gathered) sequence."""
        return slice(source * local_tokens, (source + 1) * local_tokens)


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes seen as 16-byte elements along the last dimension where its layout allows: PyTorch's
    copy of a strided tensor moves one element per thread, and 2-byte stores across NVLink waste most of
    the link; 16-byte ones are what a vectorised copy would issue."""
    width = 16 // tensor.element_size()
    aligned = all(stride % width == 0 for stride in tensor.stride()[:-1])
    aligned = aligned and tensor.storage_offset() % width == 0 and tensor.data_ptr() % 16 == 0
    if tensor.stride(-1) == 1 and tensor.shape[-1] % width == 0 and aligned:
        return tensor.view(torch.complex128)
    return tensor


def copy(target: torch.Tensor, source: torch.Tensor) -> None:
    wide_target, wide_source = wide(target), wide(source)
    if wide_target.dtype == wide_source.dtype:
        wide_target.copy_(wide_source)
    else:
        target.copy_(source)


Copier = Callable[[torch.Tensor, torch.Tensor], None]


def engine_copy(target: torch.Tensor, source: torch.Tensor) -> None:
    """On a copy engine where the layouts allow (no SMs taken from the attention beside it), else a kernel."""
    if not copy_rows(target, source):
        copy(target, source)


def head_chunks(local_heads: int, chunks: int) -> list[slice]:
    """A rank's heads in `chunks` equal parts (one part where they do not divide)."""
    if chunks < 1 or local_heads % chunks:
        chunks = 1
    size = local_heads // chunks
    return [slice(index * size, (index + 1) * size) for index in range(chunks)]


def send_qkv(
    share: Share,
    qkv: tuple[torch.Tensor, ...],
    inboxes: list[torch.Tensor],
    targets: list[int],
    chunk: slice,
    copier: Copier = copy,
) -> None:
    """Write this rank's Q, K and V ([B, S_local, H, D] each) into the inboxes ([3, B, S, H_local, D]) of
    `targets`: the `chunk` of the heads each target computes, at this rank's place in the sequence."""
    local_tokens, heads = qkv[0].shape[1:3]
    local_heads = heads // share.world
    rows = share.tokens(share.rank, local_tokens)
    for target in targets:
        first = target * local_heads
        columns = slice(first + chunk.start, first + chunk.stop)
        for index, tensor in enumerate(qkv):
            copier(inboxes[target][index, :, rows, chunk], tensor[:, :, columns])


def send_output(
    share: Share,
    out: torch.Tensor,
    inboxes: list[torch.Tensor],
    targets: list[int],
    chunk: slice,
    copier: Copier = copy,
) -> None:
    """Write this rank's attention output for the `chunk` of its heads ([B, S, chunk, D], every token) into
    the output inboxes ([B, S_local, H, D]) of `targets`: each target's tokens, at those heads."""
    local_tokens = out.shape[1] // share.world
    local_heads = inboxes[targets[0]].shape[2] // share.world
    first = share.rank * local_heads
    columns = slice(first + chunk.start, first + chunk.stop)
    for target in targets:
        copier(inboxes[target][:, :, columns], out[:, share.tokens(target, local_tokens)])


def attend(qkv_inbox: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention over the gathered sequence for the heads of `qkv_inbox` ([3, B, S, h, D]), as diffusers'
    native backend computes it (the same SDPA call on the same [B, h, S, D] views). Returns [B, S, h, D]."""
    query, key, value = (qkv_inbox[index].transpose(1, 2) for index in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)
    return out.transpose(1, 2)


class Exchange:
    """The symmetric buffers of one group for calls up to a size, and the exchange over them.

    A call, on each rank: its shares of Q, K and V go to each peer's inbox one chunk of heads at a time on a
    side stream (by `TRANSPORT`: copy kernels, or a copy engine), each chunk followed by a signal to that peer;
    its own share goes to its own inbox meanwhile. The attention of a chunk starts once every peer signalled that
    chunk, so the next chunk travels while it runs; its output goes back the same way. The call returns
    once every peer signalled all its output chunks.

    Why one inbox of each kind is enough: a rank writes into a peer's Q/K/V inbox for the next call only
    after that peer signalled all its output chunks of this call, which it sends after the attention that
    reads the inbox; and into a peer's output inbox only after that peer signalled the next call's Q/K/V,
    which it sends after copying its output inbox out."""

    def __init__(
        self, group_name: str, device: torch.device, dtype: torch.dtype, capacity: int, chunks: int = 1
    ) -> None:
        self.dtype = dtype
        # In elements of one rank's Q: its Q/K/V inbox holds 3 of them (the whole sequence at its share of
        # the heads), its output inbox 1.
        self.capacity = capacity
        self.chunks = chunks
        self.buffer, self.handle = rendezvous(group_name, 4 * capacity, dtype, device)
        self.share = Share(rank=self.handle.rank, world=self.handle.world_size)
        # High priority: its signal kernels must not queue behind the attention's blocks.
        self.side = torch.cuda.Stream(device, priority=-1)

    def inboxes(self, query_shape: torch.Size) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every rank's Q/K/V inbox ([3, B, S, H_local, D]) and output inbox ([B, S_local, H, D]) for a call
        whose Q is `query_shape` ([B, S_local, H, D]), in rank order."""
        batch, local_tokens, heads, dim = query_shape
        world = self.share.world
        qkv_shape = (3, batch, local_tokens * world, heads // world, dim)
        out_shape = (batch, local_tokens, heads, dim)
        ranks = range(world)
        qkv = [self.handle.get_buffer(rank, qkv_shape, self.dtype, 0) for rank in ranks]
        out = [self.handle.get_buffer(rank, out_shape, self.dtype, 3 * self.capacity) for rank in ranks]
        return qkv, out

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float | None,
        timeout_ms: int,
        remote: Copier = copy,
    ) -> torch.Tensor:
        share, handle, side = self.share, self.handle, self.side
        local_heads = query.shape[2] // share.world
        qkv_inboxes, out_inboxes = self.inboxes(query.shape)
        peers = [rank for rank in range(share.world) if rank != share.rank]
        chunks = head_chunks(local_heads, self.chunks)
        main = torch.cuda.current_stream(query.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for channel, chunk in enumerate(chunks):
                send_qkv(share, (query, key, value), qkv_inboxes, peers, chunk, remote)
                for peer in peers:
                    handle.put_signal(peer, channel, timeout_ms)
        send_qkv(share, (query, key, value), qkv_inboxes, [share.rank], slice(0, local_heads))
        outs = []  # alive until the side stream is joined: it reads them after this loop moves on
        for channel, chunk in enumerate(chunks):
            for peer in peers:
                handle.wait_signal(peer, channel, timeout_ms)
            out = attend(qkv_inboxes[share.rank][:, :, :, chunk], scale)
            outs.append(out)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                send_output(share, out, out_inboxes, peers, chunk, remote)
                for peer in peers:
                    handle.put_signal(peer, len(chunks) + channel, timeout_ms)
            send_output(share, out, out_inboxes, [share.rank], chunk)
        for channel in range(len(chunks)):
            for peer in peers:
                handle.wait_signal(peer, len(chunks) + channel, timeout_ms)
        main.wait_stream(side)
        # A fresh tensor: the inbox is overwritten by the next call, and the caller owns what it gets.
        return out_inboxes[share.rank].clone()


class ExchangeState:
    """This process's ulysses-p2p exchanges (one per size reached) and how they run."""

    def __init__(self, group_name: str, timeout_s: float, chunks: int, transport: str) -> None:
        self.timeout_ms = int(timeout_s * 1000)
        self.remote: Copier = engine_copy if transport == "copy-engine" else copy
        self.exchanges = ExchangeCache(
            "ulysses-p2p",
            lambda query: Exchange(group_name, query.device, query.dtype, query.numel(), chunks),
        )


def _state() -> ExchangeState:
    state = _INSTALLED.get("state")
    if state is None:
        raise RuntimeError("ulysses-p2p attention runs only after install_p2p(group)")
    return state


@torch.library.custom_op(OP_NAME, mutates_args=())
def ulysses_p2p_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Ulysses attention for one rank's [B, S_local, H, D] Q, K and V; returns its [B, S_local, H, D] output.
    An opaque operator to torch.compile: its exchange is set-up state and barriers that cannot be traced."""
    state = _state()
    return state.exchanges.for_call(query).attention(query, key, value, scale, state.timeout_ms, state.remote)


@ulysses_p2p_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    return query.new_empty(query.shape)


# How the exchange runs; the benchmarks set them to compare (gpu_parallel_comm.py's p2p variants). On 2 H200s
# (FLUX.1-dev, tier L, 1024², CUDA graphs) a step took 59.4 ms with copy kernels in one chunk, 62.5 with the
# copy engine in one chunk and 60.4 in two (docs/bench/h200x2-parallel-comm-run11.json): the copy engine moves
# the peers' shares more slowly than the kernels, more than pipelining by chunks of heads wins back.
CHUNKS = 1
TRANSPORT = "kernel"  # or "copy-engine"


def install_p2p(group: Any, timeout_s: float) -> None:
    """Ulysses through `ulysses_p2p_attention` (`P2PUlyssesAttention`) from now on, in this process, for
    `group`; `timeout_s` bounds a wait for a peer that stopped, after which the rank fails instead of
    hanging."""
    _INSTALLED["state"] = ExchangeState(group.group_name, timeout_s, CHUNKS, TRANSPORT)
    install_override(ULYSSES, "p2p", _p2p_class)


def _p2p_class(attention_dispatch: Any) -> Any:
    base = attention_dispatch.TemplatedUlyssesAttention
    native = attention_dispatch._native_attention_forward_op

    class P2PUlyssesAttention(base):  # type: ignore[misc, valid-type]
        """diffusers' Ulysses with both exchanges done by `ulysses_p2p_attention`. Self-attention without a
        mask on diffusers' native backend only; anything else takes diffusers' own path."""

        @staticmethod
        def forward(  # type: ignore[override]
            ctx: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attn_mask: torch.Tensor | None,
            dropout_p: float,
            is_causal: bool,
            scale: float | None,
            enable_gqa: bool,
            return_lse: bool,
            forward_op: Any,
            backward_op: Any,
            _parallel_config: Any = None,
        ) -> Any:
            plain = attn_mask is None and not dropout_p and not is_causal and not return_lse
            same = key.shape == query.shape and value.shape == query.shape
            if not (plain and same and forward_op is native and query.is_cuda):
                args = (
                    attn_mask,
                    dropout_p,
                    is_causal,
                    scale,
                    enable_gqa,
                    return_lse,
                    forward_op,
                    backward_op,
                )
                return base.forward(ctx, query, key, value, *args, _parallel_config=_parallel_config)
            return torch.ops.diffuserve.ulysses_p2p_attention(query, key, value, scale)

    return P2PUlyssesAttention
