"""A worker group's final VAE decode split by image rows across its ranks, with DistVAE's patch parallelism."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from typing import Any

from diffuserve.engine.frames import INNER_DECODE

log = logging.getLogger(__name__)


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
    import torch.distributed as dist
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
    vae.decode = _joint_decode(vae, decode, plain, split, world_size)
    return None


def _joint_decode(
    vae: Any, decode: Callable[..., Any], plain: Any, split: Any, world_size: int
) -> Callable[..., Any]:
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
    return joint_decode
