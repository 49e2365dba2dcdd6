"""Ring attention whose K and V travel as direct writes into the peers' GPU memory (PyTorch's symmetric
memory, by copy engine) while each rank attends over its own, the partial attentions merged by their
log-sum-exp: the group's attention where its denoiser replays as CUDA graphs (docs/design/parallel.md)."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch

from diffuserve.engine.parallel.merge import merge

log = logging.getLogger(__name__)

OP_NAME = "diffuserve::ring_p2p_attention"
# Signal channels: ACK, a peer has read what this rank last wrote into its inbox; DATA, a peer's K and V are in.
ACK, DATA = 0, 1
# This process's exchanges (one per size reached so far), its group's name and the wait for a peer, set by
# install_ring_p2p.
_STATE: dict[str, Any] = {}


def rendezvous(
    group_name: str, numel: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, Any]:
    """A symmetric buffer of `numel` elements on every rank of the group, and its handle (a collective)."""
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(numel, dtype=dtype, device=device)
    # A plain group name: torch 2.13 types it as c10d.GroupName, which older versions lack.
    return buffer, symm_mem.rendezvous(buffer, cast(Any, group_name))


def p2p_available(group: Any, device: str) -> tuple[bool, str]:
    """Whether every rank of `group` can write into the others' GPU memory: a collective set-up of a small
    symmetric buffer, agreed on by all ranks (one rank failing must not leave the others expecting it)."""
    import torch.distributed as dist

    reason = ""
    try:
        _, handle = rendezvous(group.group_name, 1024, torch.bfloat16, torch.device(device))
        handle.barrier(channel=0, timeout_ms=60_000)
        torch.cuda.synchronize(device)
    except Exception as exc:  # no P2P between the GPUs, or a PyTorch build without symmetric memory
        reason = f"the GPUs cannot write into each other's memory ({type(exc).__name__}: {exc})"
    failed = torch.tensor([1 if reason else 0], device=device)
    dist.all_reduce(failed, group=group)
    if failed.item():
        return False, reason or "another rank of the group could not set up symmetric memory"
    return True, ""


def partial_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of [B, H, S_q, D] `query` over [B, H, S_k, D] `key` and `value` alone: its output
    ([B, H, S_q, D], contiguous) and its log-sum-exp ([B, H, S_q], float32). cuDNN on CUDA: the kernel SDPA
    picks for FLUX's shapes on an H200, and one that returns the log-sum-exp."""
    query, key, value = (x.contiguous() for x in (query, key, value))  # cuDNN needs them dense
    if query.is_cuda:
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, scale=scale
        )
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)
    return out.contiguous(), lse.reshape(query.shape[:3]).float().contiguous()


class RingExchange:
    """The symmetric buffers of one group for calls up to a size, and the exchange over them.

    Each rank's inbox holds a slot of K and V per source rank ([world, 2, B, H, S_local, D]). A call, on each
    rank: on a side stream, for each peer, wait for its ACK (it has read this rank's last slot), copy K and V in
    (a contiguous copy runs on a copy engine, taking no SMs from the attention beside it) and signal DATA;
    meanwhile, attention over its own K and V; then over each peer's as it arrives, and an ACK to each peer.
    Each rank posts one ACK to each peer at set-up, so the first call's wait passes."""

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
        """Tell each peer that its slot in this rank's inbox is free."""
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
        """On the current stream: for each peer, wait for its ACK, copy K and V into its inbox, signal it."""
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


def exchange_for(key: torch.Tensor) -> RingExchange:
    """This process's exchange for calls of `key`'s size, set up (a collective: every rank reaches it at the
    same call) the first time a call is larger than every earlier one. A buffer is never freed while the
    process serves: a captured CUDA graph keeps writing to the addresses it saw at capture."""
    if "group_name" not in _STATE:
        raise RuntimeError("ring-p2p attention runs only after install_ring_p2p(group)")
    exchanges: list[RingExchange] = _STATE["exchanges"]
    for exchange in exchanges:
        if exchange.dtype == key.dtype and exchange.capacity >= key.numel():
            return exchange
    if torch.cuda.is_current_stream_capturing():
        # The buffer is a collective allocation; the CUDA graph hook then runs this call without a graph.
        raise RuntimeError("ring-p2p: a new exchange buffer cannot be set up inside a CUDA graph capture")
    world, timeout_ms = _STATE["world"], _STATE["timeout_ms"]
    exchange = RingExchange(_STATE["group_name"], world, key.device, key.dtype, key.numel(), timeout_ms)
    exchanges.append(exchange)
    megabytes = exchange.buffer.numel() * exchange.buffer.element_size() / 1e6
    log.info("ring-p2p: %.0f MB of symmetric memory for calls of %s", megabytes, tuple(key.shape))
    return exchange


@torch.library.custom_op(OP_NAME, mutates_args=())
def ring_p2p_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Ring attention of one rank: [B, S, H, D] from its [B, H, S_local, D] Q, K and V. An opaque operator
    to torch.compile: its exchange is set-up state and barriers that cannot be traced."""
    exchange = exchange_for(key)
    return merge(exchange.attention(query, key, value, scale, _STATE["timeout_ms"]))


@ring_p2p_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    batch, heads, seq, _ = query.shape
    return query.new_empty((batch, seq, heads, value.shape[-1]))


def install_ring_p2p(group: Any, timeout_s: float) -> None:
    """diffusers' ring attention through `ring_p2p_attention` from now on, in this process, for `group`;
    `timeout_s` bounds a wait for a peer that stopped, after which the rank fails instead of hanging.

    diffusers looks its ring class up in its attention dispatch module at every call and has no switch for
    another: replacing the module attribute by a subclass is all it takes."""
    import torch.distributed as dist
    from diffusers.models import attention_dispatch

    _STATE.update(
        group_name=group.group_name,
        world=dist.get_world_size(group),
        timeout_ms=int(timeout_s * 1000),
        exchanges=[],
    )
    base = attention_dispatch.TemplatedRingAttention
    if not getattr(base, "ring_p2p", False):
        attention_dispatch.TemplatedRingAttention = _ring_class(base)


def _ring_class(base: Any) -> Any:
    class P2PRingAttention(base):  # type: ignore[misc, valid-type]
        """diffusers' ring attention with K and V exchanged by `ring_p2p_attention` while the local attention
        runs. Attention without a mask, of equal Q and K/V lengths, on CUDA only; anything else takes
        diffusers' own path."""

        ring_p2p = True

        @staticmethod
        def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: Any) -> Any:  # type: ignore[override]
            # diffusers passes, after Q, K and V: attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
            # forward_op, backward_op, _parallel_config.
            attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse = rest[:6]
            plain = not (attn_mask is not None or dropout_p or is_causal or return_lse or enable_gqa)
            same = key.shape == query.shape and value.shape == query.shape
            if not (plain and same and query.is_cuda):
                return base.forward(ctx, query, key, value, *rest)
            # [B, S, H, D] -> [B, H, S, D], dense: in traced code, so inductor writes them that way at once.
            query, key, value = (x.transpose(1, 2).contiguous() for x in (query, key, value))
            return torch.ops.diffuserve.ring_p2p_attention(query, key, value, scale)

    return P2PRingAttention
