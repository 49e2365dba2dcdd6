"""Ring attention whose K and V travel as direct writes into the peers' GPU memory (PyTorch's symmetric
memory, by copy engine) while each rank's attention over its own K and V runs, the partial results merged by
their log-sum-exp as diffusers' ring merges them (PARALLEL_ATTENTION=ring-p2p)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffuserve.engine.dispatch_override import RING, install_override
from diffuserve.engine.ring_merge import merge_pair, mergeable
from diffuserve.engine.symmetric import ExchangeCache, rendezvous

OP_NAME = "diffuserve::ring_p2p_attention"
MERGED_OP_NAME = "diffuserve::ring_p2p_merged_attention"
# Signal channels: ACK, a peer has read what this rank last wrote into its inbox; DATA, a peer's K and V are in.
ACK, DATA = 0, 1
# The attention kernel, which gives the log-sum-exp the merge needs: "cudnn" (what SDPA picks on an H200 for
# these shapes) or "flash"; the benchmarks set it to compare.
KERNEL = "cudnn"
# Where a group of two merges its two partial attentions: "kernel", inside the operator by one Triton kernel
# (diffuserve.engine.ring_merge); "traced", by `merge` in traced code, which inductor fuses into the next
# layer's fp8 quantisation. The benchmarks set it to compare.
MERGE = "kernel"
# This process's exchanges and their timeout, set by install_ring_p2p.
_INSTALLED: dict[str, Any] = {}


def partial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of [B, H, S_q, D] `query` over [B, H, S_k, D] `key` and `value` alone: its output
    ([B, H, S_q, D], contiguous) and its log-sum-exp ([B, H, S_q], float32)."""
    query, key, value = (x.contiguous() for x in (query, key, value))  # cuDNN needs them dense
    if not query.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)
    elif KERNEL == "flash":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, scale=scale)
    else:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, scale=scale
        )
    return out.contiguous(), lse.reshape(query.shape[:3]).float().contiguous()


def merge(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The attention over every rank's K and V from the partial ones, `parts` = [out, lse, out, lse, ...]
    (as `partial_attention` gives them), in float32 by diffusers' ring formula. Returns [B, S, H, D]."""
    out, lse = parts[0].float(), parts[1].unsqueeze(-1)
    for index in range(2, len(parts), 2):
        part_out, part_lse = parts[index].float(), parts[index + 1].unsqueeze(-1)
        out = out - torch.sigmoid(part_lse - lse) * (out - part_out)
        lse = lse - torch.nn.functional.logsigmoid(lse - part_lse)
    return out.to(parts[0].dtype).transpose(1, 2)


class RingExchange:
    """The symmetric buffers of one group for calls up to a size, and the exchange over them.

    Each rank's inbox holds a slot of K and V per source rank ([world, 2, B, H, S_local, D]). A call, on each
    rank: on a side stream, for each peer, wait until the peer has read this rank's slot of the last call
    (ACK), copy K and V into it by copy engine (a contiguous copy: no SMs taken from the attention beside
    it) and signal the peer (DATA), then wait there for the peers' DATA; meanwhile, attention over its own K
    and V; then, peer by peer as each arrived, attention over the peer's K and V, and an ACK to each peer.
    Each rank posts one ACK to each peer when the buffer is set up, so the first call's wait passes."""

    def __init__(
        self,
        group_name: str,
        world: int,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int,
        timeout_ms: int,
    ) -> None:
        self.dtype = dtype
        self.capacity = capacity  # in elements of one rank's K
        self.world = world
        self.buffer, self.handle = rendezvous(group_name, world * 2 * capacity, dtype, device)
        self.rank = self.handle.rank
        # High priority: its signal kernels must not queue behind the attention's blocks.
        self.side = torch.cuda.Stream(device, priority=-1)
        self.post_acks(timeout_ms)

    def post_acks(self, timeout_ms: int) -> None:
        """Tell each peer that its slot in this rank's inbox is free (at set-up, and after each read)."""
        for peer in self.peers():
            self.handle.put_signal(peer, ACK, timeout_ms)

    def peers(self) -> list[int]:
        """The other ranks, from the next one on: the order their K and V are attended to."""
        return [(self.rank + step) % self.world for step in range(1, self.world)]

    def inboxes(self, key_shape: torch.Size) -> list[torch.Tensor]:
        """Every rank's inbox ([world, 2, *key_shape]) for a call whose K is `key_shape`, in rank order."""
        shape = (self.world, 2, *key_shape)
        return [self.handle.get_buffer(rank, shape, self.dtype, 0) for rank in range(self.world)]

    def send(
        self, key: torch.Tensor, value: torch.Tensor, inboxes: list[torch.Tensor], timeout_ms: int
    ) -> None:
        """On the current stream: for each peer, wait for its ACK, copy K and V into its inbox and signal it.
        (K and V on two streams, so on two copy engines at once, gained nothing: one copy engine already
        hides behind the attention, docs/bench/h200x2-parallel-comm-run13.json.)"""
        for peer in self.peers():
            self.handle.wait_signal(peer, ACK, timeout_ms)
            inboxes[peer][self.rank, 0].copy_(key)
            inboxes[peer][self.rank, 1].copy_(value)
            self.handle.put_signal(peer, DATA, timeout_ms)

    def arrivals(self, timeout_ms: int) -> list[Any]:
        """On the current (side) stream: for each peer, wait for its K and V, then record an event. The
        attention stream waits on the events: a dependency, not a kernel between its attentions."""
        events = []
        for peer in self.peers():
            self.handle.wait_signal(peer, DATA, timeout_ms)
            event = torch.cuda.Event()
            event.record()
            events.append(event)
        return events

    def receive(
        self,
        query: torch.Tensor,
        inbox: torch.Tensor,
        scale: float | None,
        timeout_ms: int,
        arrivals: list[Any] | None = None,
    ) -> list[torch.Tensor]:
        """[out, lse] over each peer's K and V, once there (by `arrivals`, else by waiting for its signal
        here), then an ACK to every peer."""
        parts: list[torch.Tensor] = []
        for index, peer in enumerate(self.peers()):
            if arrivals is None:
                self.handle.wait_signal(peer, DATA, timeout_ms)
            else:
                torch.cuda.current_stream().wait_event(arrivals[index])
            parts += partial_attention(query, inbox[peer, 0], inbox[peer, 1], scale)
        # After every read: a peer's next write cannot overtake an attention still reading its slot.
        self.post_acks(timeout_ms)
        return parts

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float | None,
        timeout_ms: int,
    ) -> list[torch.Tensor]:
        """[out, lse] of this rank's [B, H, S_local, D] Q over its own K and V, then over each peer's."""
        key, value = key.contiguous(), value.contiguous()  # a contiguous copy is one copy-engine transfer
        inboxes = self.inboxes(key.shape)
        main = torch.cuda.current_stream(query.device)
        side = self.side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.send(key, value, inboxes, timeout_ms)
            arrivals = self.arrivals(timeout_ms)
        parts = list(partial_attention(query, key, value, scale))
        parts += self.receive(query, inboxes[self.rank], scale, timeout_ms, arrivals)
        # K and V stay alive until here: the side stream reads them, and the caller may free them after.
        main.wait_stream(side)
        return parts


def _partial_attentions(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> list[torch.Tensor]:
    """[out, lse] of this rank's Q over its own K and V, then over each peer's, through this process's
    exchange for calls of this size."""
    if "exchanges" not in _INSTALLED:
        raise RuntimeError("ring-p2p attention runs only after install_ring_p2p(group)")
    exchange = _INSTALLED["exchanges"].for_call(key)
    return exchange.attention(query, key, value, scale, _INSTALLED["timeout_ms"])


@torch.library.custom_op(OP_NAME, mutates_args=())
def ring_p2p_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, world: int
) -> list[torch.Tensor]:
    """Ring attention's partial results for one rank's [B, H, S_local, D] Q, K and V: [out, lse] over its own
    K and V, then over each of the `world` - 1 peers'. An opaque operator to torch.compile (its exchange is
    set-up state and barriers that cannot be traced); `merge` combines the parts in traced code, where
    inductor fuses it with the layers around it."""
    return _partial_attentions(query, key, value, scale)


@ring_p2p_attention.register_fake
def _(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, world: int
) -> list[torch.Tensor]:
    out_shape = (*query.shape[:3], value.shape[-1])
    parts = []
    for _ in range(world):
        parts += [query.new_empty(out_shape), query.new_empty(query.shape[:3], dtype=torch.float32)]
    return parts


@torch.library.custom_op(MERGED_OP_NAME, mutates_args=())
def ring_p2p_merged_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Ring attention of one rank of a group of two, merged: [B, S, H, D] from its [B, H, S_local, D] Q, K
    and V (`ring_p2p_attention` with the merge inside, by `merge_pair`)."""
    return merge_pair(*_partial_attentions(query, key, value, scale))


@ring_p2p_merged_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    batch, heads, seq, _ = query.shape
    return query.new_empty((batch, seq, heads, value.shape[-1]))


def install_ring_p2p(group: Any, timeout_s: float) -> None:
    """Ring attention through `ring_p2p_attention` (`P2PRingAttention`) from now on, in this process, for
    `group`; `timeout_s` bounds a wait for a peer that stopped, after which the rank fails instead of
    hanging."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    timeout_ms = int(timeout_s * 1000)
    _INSTALLED["timeout_ms"] = timeout_ms
    _INSTALLED["exchanges"] = ExchangeCache(
        "ring-p2p",
        lambda key: RingExchange(group.group_name, world, key.device, key.dtype, key.numel(), timeout_ms),
    )
    install_override(RING, "p2p", _ring_class)


def _ring_class(attention_dispatch: Any) -> Any:
    base = attention_dispatch.TemplatedRingAttention

    class P2PRingAttention(base):  # type: ignore[misc, valid-type]
        """diffusers' ring attention with K and V exchanged by `ring_p2p_attention` while the local attention
        runs. Attention without a mask, of equal Q and K/V lengths, on CUDA only; anything else takes
        diffusers' own path."""

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
            plain = (
                attn_mask is None and not dropout_p and not is_causal and not return_lse and not enable_gqa
            )
            same = key.shape == query.shape and value.shape == query.shape
            if not (plain and same and query.is_cuda):
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
            world = _parallel_config.context_parallel_config.ring_degree
            # [B, S, H, D] -> [B, H, S, D], dense: in traced code, so inductor writes them that way at once.
            query, key, value = (x.transpose(1, 2).contiguous() for x in (query, key, value))
            if world == 2 and MERGE == "kernel" and mergeable(query.shape[-1]):
                return torch.ops.diffuserve.ring_p2p_merged_attention(query, key, value, scale)
            parts = torch.ops.diffuserve.ring_p2p_attention(query, key, value, scale, world)
            return merge(parts)

    return P2PRingAttention
