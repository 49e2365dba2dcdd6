"""FLUX.1's text-encoder outputs by prompt, kept on the device (LRU in bytes): a prompt seen again skips the
encoders, and the pipeline is handed its embeddings instead of its text."""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

# FLUX.1's pipelines (text-to-image, image-to-image, inpainting, Kontext) all encode with exactly these
# parameters and return the T5 sequence and CLIP's pooled vector per prompt; other families' `encode_prompt`
# (SD3's, with classifier-free guidance and a third encoder) take more and return more.
ENCODE_PARAMETERS = {
    "prompt",
    "prompt_2",
    "device",
    "num_images_per_prompt",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "max_sequence_length",
    "lora_scale",
}
CALL_PARAMETERS = {"prompt_embeds", "pooled_prompt_embeds"}
DEFAULT_SEQUENCE_LENGTH = 512  # FLUX.1's own default


def takes_embeddings(pipeline: Any) -> bool:
    """Whether `pipeline` encodes prompts the FLUX.1 way and takes the embeddings in their place."""
    encode = getattr(pipeline, "encode_prompt", None)
    if encode is None:
        return False
    encodes = set(inspect.signature(encode).parameters)
    calls = set(inspect.signature(pipeline.__call__).parameters)
    return encodes == ENCODE_PARAMETERS and calls >= CALL_PARAMETERS


class PromptCache:
    """The embeddings of the prompts last used, at most `capacity_bytes` of them. A miss is encoded with the
    other misses of its batch in one call; the same request alone, twice, gets the same embeddings (the second
    time from here), so the same image. Adapters (LoRA) never touch the text encoders: an entry serves any."""

    def __init__(self, pipeline: Any, capacity_bytes: int, max_sequence_length: int | None) -> None:
        self._pipeline = pipeline
        self.capacity_bytes = capacity_bytes
        self._sequence_length = max_sequence_length or DEFAULT_SEQUENCE_LENGTH
        self._entries: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        # The last call's prompts taken from here and encoded (unique ones), for its batch's metrics.
        self.last: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self._entries)

    def embeddings(self, prompts: list[str]) -> dict[str, Any]:
        """The pipeline's `prompt_embeds` and `pooled_prompt_embeds` for `prompts`, one row per prompt."""
        import torch

        found: dict[str, tuple[Any, Any]] = {}
        for prompt in dict.fromkeys(prompts):
            entry = self._entries.get(prompt)
            if entry is not None:
                self._entries.move_to_end(prompt)
                found[prompt] = entry
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in found]
        self.last = (len(prompts) - sum(prompts.count(prompt) for prompt in missing), len(missing))
        self.hits += self.last[0]
        self.misses += self.last[1]
        if missing:
            with torch.no_grad():
                sequence, pooled, _ids = self._pipeline.encode_prompt(
                    prompt=missing,
                    prompt_2=None,
                    device=self._pipeline._execution_device,
                    num_images_per_prompt=1,
                    max_sequence_length=self._sequence_length,
                )
            for index, prompt in enumerate(missing):
                # Own storage: a row of the batch's tensor would keep the whole batch alive.
                entry = (sequence[index].clone(), pooled[index].clone())
                found[prompt] = entry
                self._put(prompt, entry)
        rows = [found[prompt] for prompt in prompts]
        return {
            "prompt_embeds": torch.stack([row[0] for row in rows]),
            "pooled_prompt_embeds": torch.stack([row[1] for row in rows]),
        }

    def _put(self, prompt: str, entry: tuple[Any, Any]) -> None:
        size = sum(tensor.numel() * tensor.element_size() for tensor in entry)
        if size > self.capacity_bytes:
            return
        while self._entries and self.bytes + size > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= sum(tensor.numel() * tensor.element_size() for tensor in evicted)
        self._entries[prompt] = entry
        self.bytes += size
