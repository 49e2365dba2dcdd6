"""The sections `serve --help` lists the settings in, each setting in exactly one (a test holds that)."""

from __future__ import annotations

SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("models", "model_name", "model_size", "weights", "dtype", "warmup"),
    "server": ("host", "port", "public_url", "forwarded_allow_ips", "playground", "api_keys"),
    "batching and queues": (
        "model_batch",
        "max_queue",
        "batch_wait_ms",
        "max_images_per_request",
        "max_request_cost",
        "request_timeout",
    ),
    "devices and GPUs": (
        "devices",
        "model_devices",
        "cpu_threads",
        "parallel",
        "parallel_attention",
        "parallel_decode",
        "cuda_graphs",
    ),
    "adapters (LoRA)": ("lora_dir", "loras", "lora_max_rank", "lora_slots", "lora_cache_mb", "lora_batching"),
    "downloads and caches": ("hf_token", "hf_home", "cache_dir"),
    "image URLs": ("image_store_dir", "image_store_max_bytes", "image_url_ttl_seconds"),
    "limits and faults": (
        "max_body_bytes",
        "max_upload_bytes",
        "max_input_pixels",
        "max_body_memory_bytes",
        "header_timeout",
        "body_timeout",
        "send_timeout",
        "max_connections",
        "watchdog_factor",
        "watchdog_min_seconds",
        "drain_timeout",
    ),
    "logging": ("log_format", "log_level"),
}
