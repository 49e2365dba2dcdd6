"""Ulysses attention with one all-to-all for Q, K and V together instead of diffusers' three
(PARALLEL_ATTENTION=ulysses); `auto` uses it where the group's denoiser does not run as CUDA graphs
(`diffuserve.engine.parallel.resolve_attention` says why)."""

from __future__ import annotations

from typing import Any

from diffuserve.engine.dispatch_override import ULYSSES, install_override


def install_fused_qkv() -> None:
    """Ulysses with Q, K and V in one all-to-all (`FusedQKVUlyssesAttention`) from now on, in this process."""
    install_override(ULYSSES, "fused", _fused_class)


def _fused_class(attention_dispatch: Any) -> Any:
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

    return FusedQKVUlyssesAttention
