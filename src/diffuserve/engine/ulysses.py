"""Ulysses attention with one all-to-all for Q, K and V together instead of diffusers' three (installed into
diffusers' attention dispatch, which has no switch for it)."""

from __future__ import annotations

from typing import Any

_INSTALLED: dict[str, Any] = {}


def install_fused_qkv(chunks: int = 1) -> None:
    """Make diffusers' context-parallel dispatch use `FusedQKVUlyssesAttention` for Ulysses from now on, in
    this process. diffusers looks the class up by name on every attention call, so this is all it takes.
    `chunks` > 1 splits each rank's heads into that many shares whose exchanges overlap the attention of the
    share before (inference only)."""
    from diffusers.models import attention_dispatch

    if _INSTALLED.get("chunks") == chunks:
        return
    uninstall_fused_qkv()
    fused = _fused_class(attention_dispatch, chunks)
    _INSTALLED["chunks"] = chunks
    _INSTALLED["original"] = attention_dispatch.TemplatedUlyssesAttention
    _INSTALLED["fused"] = fused
    attention_dispatch.TemplatedUlyssesAttention = fused


def uninstall_fused_qkv() -> None:
    """Back to diffusers' own three all-to-alls (for comparisons in one process)."""
    from diffusers.models import attention_dispatch

    if "fused" in _INSTALLED:
        attention_dispatch.TemplatedUlyssesAttention = _INSTALLED.pop("original")
        _INSTALLED.pop("fused")
        _INSTALLED.pop("chunks")


def _start_all_to_all(x: Any, group: Any) -> Any:
    """The exchange without its wait: work queued between this and `_finish_all_to_all` overlaps it."""
    import torch

    flat = x.flatten()
    world = group.size()
    share = [flat.numel() // world] * world
    return torch.ops._c10d_functional.all_to_all_single(flat, share, share, group.group_name)


def _finish_all_to_all(pending: Any, shape: Any) -> Any:
    import torch

    return torch.ops._c10d_functional.wait_tensor(pending).reshape(shape)


def _fused_class(attention_dispatch: Any, chunks: int) -> Any:
    import torch

    base = attention_dispatch.TemplatedUlyssesAttention
    all_to_all = attention_dispatch._all_to_all_single

    class FusedQKVUlyssesAttention(base):  # type: ignore[misc, valid-type]
        """diffusers' Ulysses forward with Q, K and V stacked into one all-to-all. On NVLink the exchange of a
        FLUX block's Q, K or V (7 MB each way) costs about as much in per-collective latency as in transfer, so
        one collective of three times the size costs well under three. Same bytes, same layout after the
        exchange, so the attention sees exactly what diffusers' version gives it; backward is diffusers'."""

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
            args = (attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, forward_op, backward_op)
            if key.shape != query.shape or value.shape != query.shape or attn_mask is not None:
                # Cross-attention lengths or a mask: diffusers' own path handles them.
                return base.forward(ctx, query, key, value, *args, _parallel_config=_parallel_config)
            config = _parallel_config.context_parallel_config
            group = config._ulysses_mesh.get_group()
            world = config.ulysses_degree
            ctx.forward_op, ctx.backward_op, ctx._parallel_config = forward_op, backward_op, _parallel_config
            batch, local_tokens, heads, dim = query.shape
            local_heads = heads // world
            if chunks > 1 and local_heads % chunks == 0 and not return_lse:
                return FusedQKVUlyssesAttention._overlapped(ctx, query, key, value, group, world, *args[1:])
            # (3, B, S_local, H, D) -> (world, 3, S_local, B, H_local, D): the rank a head share goes to first.
            qkv = torch.stack((query, key, value)).reshape(3, batch, local_tokens, world, local_heads, dim)
            qkv = all_to_all(qkv.permute(3, 0, 2, 1, 4, 5).contiguous(), group)
            # Now (world, 3, S_local, B, H_local, D) by source rank, i.e. by sequence share, in order.
            qkv = qkv.transpose(0, 1).flatten(1, 2)  # (3, S, B, H_local, D)
            query, key, value = (x.permute(1, 0, 2, 3).contiguous() for x in qkv.unbind(0))
            out = forward_op(
                ctx,
                query,
                key,
                value,
                None,
                dropout_p,
                is_causal,
                scale,
                enable_gqa,
                return_lse,
                _save_ctx=True,
                _parallel_config=_parallel_config,
            )
            lse = None
            if return_lse:
                out, lse, *_ = out
            out = (
                out.reshape(batch, world, local_tokens, local_heads, dim).permute(1, 3, 0, 2, 4).contiguous()
            )
            out = all_to_all(out, group).flatten(0, 1).permute(1, 2, 0, 3).contiguous()
            if lse is not None:
                lse = lse.reshape(batch, world, local_tokens, local_heads).permute(1, 3, 0, 2).contiguous()
                lse = all_to_all(lse, group).flatten(0, 1).permute(1, 2, 0).contiguous()
                return out, lse
            return out

        @staticmethod
        def _overlapped(
            ctx: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            group: Any,
            world: int,
            dropout_p: float,
            is_causal: bool,
            scale: float | None,
            enable_gqa: bool,
            return_lse: bool,
            forward_op: Any,
            backward_op: Any,
        ) -> torch.Tensor:
            """The same exchange in `chunks` shares of each rank's heads, all sent at once: share c's attention
            runs while share c+1 is still crossing, and its output goes back while share c+1 is computed."""
            batch, local_tokens, heads, dim = query.shape
            share = heads // world // chunks
            qkv = torch.stack((query, key, value)).reshape(3, batch, local_tokens, world, chunks, share, dim)
            sent = []
            for c in range(chunks):
                part = (
                    qkv[:, :, :, :, c].permute(3, 0, 2, 1, 4, 5).contiguous()
                )  # (world, 3, S_local, B, h, D)
                sent.append((_start_all_to_all(part, group), part.shape))
            returned = []
            for pending, shape in sent:
                part = _finish_all_to_all(pending, shape).transpose(0, 1).flatten(1, 2)  # (3, S, B, h, D)
                q, k, v = (x.permute(1, 0, 2, 3).contiguous() for x in part.unbind(0))
                out = forward_op(
                    ctx, q, k, v, None, dropout_p, is_causal, scale, enable_gqa, False,
                    _save_ctx=False, _parallel_config=ctx._parallel_config,
                )  # fmt: skip
                out = out.reshape(batch, world, local_tokens, share, dim).permute(1, 3, 0, 2, 4).contiguous()
                returned.append((_start_all_to_all(out, group), out.shape))
            # Each (world, h, B, S_local, D) by the rank whose heads they are: heads in order are rank-major.
            outs = torch.stack([_finish_all_to_all(p, shape) for p, shape in returned], dim=1)
            return outs.flatten(0, 2).permute(1, 2, 0, 3).contiguous()

    return FusedQKVUlyssesAttention
