"""Counting a prompt's text tokens the way the model's denoiser reads them, for the responses' `usage`."""

from __future__ import annotations

from typing import Any


def prompt_tokenizer(pipeline: Any) -> Any:
    """The tokenizer of the text encoder whose sequence the denoiser attends to: T5's for FLUX (the second
    encoder; CLIP only gives it a pooled vector), CLIP's for SDXL and single-encoder pipelines."""
    if hasattr(pipeline, "_pack_latents") and getattr(pipeline, "tokenizer_2", None) is not None:
        return pipeline.tokenizer_2
    return getattr(pipeline, "tokenizer", None)


def count_text_tokens(tokenizer: Any, prompts: list[str], max_length: int | None) -> list[int]:
    """Tokens per prompt, special tokens included and cut where the pipeline cuts (`max_length`, else the
    tokenizer's own limit); 0 for every prompt where the model has no tokenizer."""
    if tokenizer is None:
        return [0] * len(prompts)
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" is a huge sentinel
        limit = None
    encoded = tokenizer(prompts, truncation=limit is not None, max_length=limit)
    return [len(ids) for ids in encoded["input_ids"]]
