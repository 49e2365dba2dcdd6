"""Qwen text encoders with random weights: Qwen2.5-VL-7B (Qwen-Image, its vision tower read by the edit model) and
Qwen3-4B (Z-Image-Turbo, FLUX.2 klein), their configs as released, on the project's word-level tokenizer ids."""

from __future__ import annotations

from typing import Any

from diffuserve.models.tokenizer import build_qwen_tokenizer

# Qwen/Qwen-Image text_encoder/config.json = Qwen/Qwen2.5-VL-7B-Instruct config.json (8.29 B parameters).
QWEN25_VL_7B: dict[str, Any] = {
    "text_config": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "vocab_size": 152064,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
# Qwen/Qwen3-4B config.json, as shipped in Tongyi-MAI/Z-Image-Turbo and black-forest-labs/FLUX.2-klein-4B
# text_encoder/config.json (4.02 B parameters, the output embedding tied to the input one).
QWEN3_4B: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
# Qwen2.5-VL's image processor as Qwen/Qwen-Image-Edit ships it (processor/preprocessor_config.json).
QWEN_VL_IMAGE_PROCESSOR: dict[str, Any] = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12845056,
}


def _marker_ids(tokenizer: Any) -> dict[str, int]:
    """The vision markers' ids in our tokenizer, where the model looks for them (image placement, M-RoPE)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def build_qwen25_vl(config: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**config["text_config"], "pad_token_id": tokenizer.pad_token_id}
    full = Qwen2_5_VLConfig(**{**config, "text_config": text, **_marker_ids(tokenizer)})
    return Qwen2_5_VLForConditionalGeneration(full).eval()


def build_qwen3(config: dict[str, Any], tokenizer: Any, *, causal_lm: bool) -> Any:
    """Qwen3ForCausalLM (what FLUX.2 klein's pipeline expects) or the bare Qwen3Model (Z-Image's); with tied
    embeddings both have the same parameters."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    full = Qwen3Config(**config, pad_token_id=tokenizer.pad_token_id)
    return (Qwen3ForCausalLM(full) if causal_lm else Qwen3Model(full)).eval()


def build_qwen_vl_processor(tokenizer: Any, image_processor: dict[str, Any]) -> Any:
    """Qwen2VLProcessor on our tokenizer: it expands each <|image_pad|> into the picture's merged patch tokens.
    Pictures only: its video processor needs torchvision, and the edit pipeline sends no video."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    class PicturesProcessor(Qwen2VLProcessor):  # type: ignore[misc]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, **kwargs)

    return PicturesProcessor(image_processor=Qwen2VLImageProcessor(**image_processor), tokenizer=tokenizer)


def qwen_tokenizer(words: list[str] | None = None) -> Any:
    from diffuserve.models.tokenizer import build_vocab

    return build_qwen_tokenizer(build_vocab(words))
