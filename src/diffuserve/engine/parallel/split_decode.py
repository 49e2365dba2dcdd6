"""A worker group's final VAE decode split by image rows across its ranks, with DistVAE's patch parallelism."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.distributed as dist

from diffuserve.engine.frames import INNER_DECODE


class BandGroupNorm(torch.nn.Module):
    """A group norm over a band of rows with the whole image's statistics, in fewer passes than DistVAE's own.

    DistVAE's `PatchGroupNorm` reduces twice across the ranks (the sums, then the squares about the mean) and
    normalises in six elementwise passes over the band in its dtype. Here each rank reads its band twice for
    the float32 sums of x and x², the ranks reduce once, and one `batch_norm` in inference mode, with each
    (image, channel) given its group's mean and variance, normalises and applies the affine in a single pass,
    computing in float32 as `group_norm` does.
    """

    def __init__(self, norm: Any) -> None:
        super().__init__()
        self.num_groups: int = norm.num_groups
        self.eps: float = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.group = norm.parallel_context.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, self.num_groups, -1)
        count = torch.full_like(grouped[:, :, 0], grouped.shape[-1], dtype=torch.float32)
        squares = torch.linalg.vector_norm(grouped, 2, dim=-1, dtype=torch.float32).square()
        totals = torch.stack([grouped.sum(dim=-1, dtype=torch.float32), squares, count])
        dist.all_reduce(totals, group=self.group)
        mean = totals[0] / totals[2]
        # The one-pass variance in float32: fine unless a group's mean were thousands of its deviations.
        var = (totals[1] / totals[2] - mean.square()).clamp_min(0)
        per_channel = channels // self.num_groups
        mean = mean.repeat_interleave(per_channel, dim=1).flatten()
        var = var.repeat_interleave(per_channel, dim=1).flatten()
        weight = None if self.weight is None else self.weight.float().repeat(batch)
        bias = None if self.bias is None else self.bias.float().repeat(batch)
        flat = x.reshape(1, batch * channels, *x.shape[2:])
        out = torch.nn.functional.batch_norm(flat, mean, var, weight, bias, training=False, eps=self.eps)
        return out.view_as(x)


def split_vae_decode(pipeline: Any, world_size: int) -> str | None:
    """Make the pipeline's `vae.decode` a joint decode of the group's process group: every rank decodes one
    band of rows (DistVAE's `parallelize_decoder`: each 3×3 convolution takes its neighbours' edge rows, each
    group norm the whole group's statistics) and all of them end with the whole image. Returns why the decode
    stays whole, or None once it is split.

    Every rank must then call `vae.decode` for each batch, with the same latents. Previews, which the leader
    decodes alone, reach the plain decoder through the wrapper's `INNER_DECODE` attribute.
    """
    vae = getattr(pipeline, "vae", None)
    decode = getattr(vae, "decode", None)
    if vae is None or decode is None or world_size < 2:
        return "no VAE decode to split" if world_size > 1 else "one rank: nothing to split"
    from distvae.vae import decoder_adapter_name, parallelize_decoder

    if decoder_adapter_name(vae) is None:
        return f"DistVAE has no adapter for the decoder of {type(vae).__name__}"
    plain = vae.decoder
    # DistVAE rebuilds the decoder it is given around its own layers; given a copy that shares every weight,
    # the plain decoder stays as it was, for the leader's previews, at the cost of a few module objects.
    shared = {id(t): t for t in itertools.chain(plain.parameters(), plain.buffers())}
    vae.decoder = copy.deepcopy(plain, memo=shared)
    try:
        parallelize_decoder(vae, dist.group.WORLD)
        split = vae.decoder
    finally:
        vae.decoder = plain
    from distvae.models.layers.normalization import PatchGroupNorm

    for parent in list(split.modules()):  # DistVAE's group norms -> BandGroupNorm
        for name, child in list(parent.named_children()):
            if isinstance(child, PatchGroupNorm):
                setattr(parent, name, BandGroupNorm(child))

    def joint_decode(*args: Any, **kwargs: Any) -> Any:
        latents = args[0] if args else kwargs.get("z")
        # Fewer latent rows than ranks leave a rank without a band: every rank decodes the whole image
        # instead. Each decides from the same shape, so all take the same path and none waits on the others.
        if latents is None or latents.shape[-2] < world_size:
            return decode(*args, **kwargs)
        vae.decoder = split
        try:
            return decode(*args, **kwargs)
        finally:
            vae.decoder = plain

    setattr(joint_decode, INNER_DECODE, decode)
    vae.decode = joint_decode
    return None
