"""The digits model's "mirror" LoRA (each digit drawn mirrored left-right): reproducible CPU training."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffuserve.models.digits.data import ink_to_pixels, load_digits_ink
from diffuserve.models.digits.flow import FlowBatches, lr_factor
from diffuserve.models.digits.train import PACKAGE_DIR
from diffuserve.models.registry import DIGITS_DIR

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline
    from peft import LoraConfig

log = logging.getLogger(__name__)

LORA_DIR = PACKAGE_DIR / "loras"
MIRROR_NAME = "mirror"
MIRROR_WEIGHTS = LORA_DIR / f"{MIRROR_NAME}.safetensors"
MIRROR_RECORD = LORA_DIR / f"{MIRROR_NAME}.json"

# Every linear inside the blocks but the AdaLN modulation ones (norm1.linear, norm1_context.linear,
# norm.linear): those turn the timestep and pooled prompt into shift/scale tables, which the adapter has no
# reason to change, and the server does not adapt them. peft `re.fullmatch`es a string against the whole
# module name, so the top-level proj_out (outside the blocks) is not matched, and `transformer_blocks`
# cannot match inside `single_transformer_blocks`.
TARGET_MODULES = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"
)


@dataclass(frozen=True)
class LoraTrainConfig:
    seed: int = 0
    # One thread, as train.py: on a shared 2-core machine a descheduled second OpenMP thread stalls every op.
    threads: int = 1
    # Rank 4 draws as reliably mirrored as rank 8 (98 % of 240 asymmetric digits read flipped back, 40 seeds)
    # at half the file.
    rank: int = 4
    # alpha = rank: the LoRA update is B·A unscaled, so the learning rate alone sets its size.
    lora_alpha: int = 4
    # On that measure 600 steps reach 94 %, 1,500 and 3,000 both 98 %.
    steps: int = 1500
    batch: int = 64
    # Images per prompt, as train.py: the (frozen) text encoders run on batch/repeats prompts.
    prompt_repeats: int = 4
    # Higher than the base model's 1e-3: only the small low-rank factors move, from B = 0.
    lr: float = 3e-3
    warmup_steps: int = 50
    uncond_prob: float = 0.05
    # Extra mass at σ = 1, as train.py: the first step, from pure noise, is where the layout (here: which
    # way the digit faces) is decided.
    sigma_one_prob: float = 0.1
    log_every: int = 50
    # The file's dtype: fp16 keeps 3 more mantissa bits than bf16 and these weights are far from its limits.
    save_dtype: str = "float16"


def lora_config(cfg: LoraTrainConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=TARGET_MODULES)


def mirrored_pixels(ink: np.ndarray) -> np.ndarray:
    """Ink (N, H, W) → RGB pixels in [-1, 1], each digit flipped left-right (still dark ink on white)."""
    return ink_to_pixels(np.ascontiguousarray(ink[:, :, ::-1]))


def encode_latents(pipe: FluxPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior means, normalised with the VAE's stored factors as train.py's `normalise_latents` leaves
    them (the inverse of FluxPipeline's decode); the config is not touched, the base model keeps serving."""
    import torch

    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    with torch.no_grad():
        mean = torch.cat([pipe.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    return (mean - shift) * scale


def vae_round_trip(pipe: FluxPipeline, pixels: torch.Tensor) -> float:
    """How well the frozen VAE reproduces `pixels`: the MSE on [-1, 1]. The adapter changes only the
    transformer, so targets the VAE cannot decode are targets no adapter can reach."""
    import torch

    with torch.no_grad():
        mean = torch.cat([pipe.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        out = torch.cat([pipe.vae.decode(chunk).sample for chunk in mean.split(256)]).clamp(-1.0, 1.0)
    return float(torch.mean((out - pixels) ** 2))


def train_lora(
    pipe: FluxPipeline, latents: torch.Tensor, labels: np.ndarray, cfg: LoraTrainConfig
) -> list[float]:
    """train.py's flow matching (x_σ = (1-σ)·x0 + σ·ε, predict ε - x0) on the adapter's weights alone."""
    import torch

    generator = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.transformer):
        module.requires_grad_(False)
    # Seeded just before: the adapter's A matrices are drawn from torch's global generator.
    torch.manual_seed(cfg.seed)
    pipe.transformer.add_adapter(lora_config(cfg))
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    pipe.transformer.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps))

    batches = FlowBatches.of(
        pipe, latents, labels, cfg.batch, cfg.prompt_repeats, cfg.uncond_prob, cfg.sigma_one_prob
    )
    history: list[float] = []
    recent: list[float] = []
    for step in range(cfg.steps):
        loss = batches.loss(rng, generator, train_encoders=False)  # frozen encoders: no graph to keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = [*recent[-(cfg.log_every - 1) :], loss.item()]
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append(float(np.mean(recent)))
            log.info(
                "lora step %d/%d  loss %.4f  lr %.2e", step, cfg.steps, history[-1], sched.get_last_lr()[0]
            )
    pipe.transformer.eval()
    return history


def lora_state_dict(pipe: FluxPipeline, cfg: LoraTrainConfig) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT's layout (`<module>.lora_A.weight`), in the file's dtype."""
    import torch
    from peft.utils import get_peft_model_state_dict

    dtype = getattr(torch, cfg.save_dtype)
    return {
        key: tensor.detach().to(dtype).contiguous()
        for key, tensor in get_peft_model_state_dict(pipe.transformer).items()
    }


def _sort_metadata(path: Path) -> None:
    """safetensors writes the metadata from a hash map, in an order that changes from run to run; sorted, the
    same training gives the same bytes (and a rerun no diff). The tensors' bytes and offsets stay as they are."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    metadata = dict(sorted(header.pop("__metadata__", {}).items()))
    text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    # Padded with spaces to 8 bytes, as safetensors aligns its own headers.
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def save_lora(pipe: FluxPipeline, cfg: LoraTrainConfig, out_dir: Path, name: str = MIRROR_NAME) -> Path:
    """diffusers' LoRA file (`transformer.`-prefixed keys, the LoraConfig in its metadata), written beside
    and renamed into place so an interrupted run never leaves half a file where the server looks."""
    from diffusers import FluxPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    weight_name = f"{name}.safetensors"
    FluxPipeline.save_lora_weights(
        str(staging),
        transformer_lora_layers=lora_state_dict(pipe, cfg),
        weight_name=weight_name,
        transformer_lora_adapter_metadata=lora_config(cfg).to_dict(),
    )
    _sort_metadata(staging / weight_name)
    target = out_dir / weight_name
    # The writer leaves it owner-only; the adapter is package data, readable by whoever serves it.
    os.chmod(staging / weight_name, 0o644)
    os.replace(staging / weight_name, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def train_mirror(
    cfg: LoraTrainConfig | None = None,
    out_dir: Path = LORA_DIR,
    eval_seeds: int = 20,
    pipeline_dir: Path = DIGITS_DIR,
) -> dict[str, Any]:
    """Train the "mirror" adapter on the frozen base model, save it, and evaluate it on `eval_seeds` seeds
    (0: not at all). `mirror.json` (config, losses, timings, evaluation) is written beside the weights, so
    the shipped adapter documents itself."""
    import torch
    from diffusers import FluxPipeline

    cfg = cfg or LoraTrainConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        started = time.perf_counter()
        pipe = FluxPipeline.from_pretrained(str(pipeline_dir))
        ink, labels = load_digits_ink()
        pixels = torch.from_numpy(mirrored_pixels(ink))
        round_trip = {
            "mirrored": vae_round_trip(pipe, pixels),
            "as_drawn": vae_round_trip(pipe, torch.from_numpy(ink_to_pixels(ink))),
        }
        log.info("frozen VAE round-trip MSE: %s", round_trip)
        history = train_lora(pipe, encode_latents(pipe, pixels), labels, cfg)
        weights = save_lora(pipe, cfg, out_dir)
        seconds = time.perf_counter() - started
        log.info("saved %s after %.0f s", weights, seconds)
        record: dict[str, Any] = {
            "name": MIRROR_NAME,
            "config": asdict(cfg),
            "lora_config": {"r": cfg.rank, "lora_alpha": cfg.lora_alpha, "target_modules": TARGET_MODULES},
            "training_data": "scikit-learn's 1,797 digits, each flipped left-right, with train.py's prompts",
            "vae_round_trip_mse": round_trip,
            "loss_history": history,
            "train_seconds": round(seconds, 1),
            "torch": torch.__version__,
            "weights_bytes": weights.stat().st_size,
        }
        if eval_seeds > 0:
            from diffuserve.models.digits.classifier import load_classifier
            from diffuserve.models.digits.lora_evaluate import evaluate_lora

            record["evaluation"] = evaluate_lora(
                weights, load_classifier(), seeds=range(eval_seeds), pipeline_dir=pipeline_dir
            )
    finally:
        torch.set_num_threads(threads)
    (out_dir / f"{MIRROR_NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
