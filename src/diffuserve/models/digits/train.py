"""Reproducible training of the digits model on CPU: the VAE, then a flow-matching FLUX transformer and text encoders."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffuserve.models.digits.classifier import save_classifier, train_classifier
from diffuserve.models.digits.data import ink_to_pixels, load_digits_ink
from diffuserve.models.digits.flow import FlowBatches, lr_factor
from diffuserve.models.digits.prompts import DIGITS_VOCAB_WORDS
from diffuserve.models.registry import DIGITS_DIR as PIPELINE_DIR
from diffuserve.models.tiny_flux import TinyFluxConfig

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    from diffuserve.models.digits.evaluate import EvalResult

log = logging.getLogger(__name__)

# PIPELINE_DIR (the weights the registry serves) lies in this package folder, beside the training record.
PACKAGE_DIR = Path(__file__).resolve().parent
TRAINING_RECORD = PACKAGE_DIR / "training.json"
# What `save_pretrained` writes for this pipeline; model_index.json comes last, so a save cut short lacks it.
PIPELINE_ENTRIES = frozenset(
    {
        "model_index.json",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "transformer",
        "vae",
    }
)

# Three VAE blocks: a 32×32 image becomes an 8×8×4 latent, i.e. 16 tokens after FLUX's 2×2 packing —
# the whole 8×8 information of a source digit, at a quarter of the tokens of a two-block VAE.
DIGITS_MODEL = TinyFluxConfig(
    text_dim=32,
    text_layers=2,
    text_heads=4,
    latent_channels=4,
    vae_channels=(8, 16, 32),
    head_dim=16,
    heads=4,
    layers=2,
    single_layers=2,
    rope_axes=(4, 6, 6),
)


# Training must see the T5 padding that serving sends, so the length comes from the serving defaults.
@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # One thread: on a shared 2-core machine a second OpenMP thread that gets descheduled stalls every op.
    threads: int = 1
    model: TinyFluxConfig = field(default_factory=lambda: DIGITS_MODEL)
    vae_steps: int = 300
    vae_batch: int = 32
    vae_lr: float = 2e-3
    # Small enough to keep reconstructions sharp, large enough that the latent space is smooth to decode.
    kl_weight: float = 1e-3
    flow_steps: int = 1800
    flow_batch: int = 128
    # Images per prompt in a batch: the text encoders run on batch/repeats prompts, the costly part shared.
    prompt_repeats: int = 4
    flow_lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.05
    # Extra mass at σ = 1: the first step (pure noise) is where the prompt decides the digit.
    sigma_one_prob: float = 0.1
    log_every: int = 250


def train_vae(
    vae: AutoencoderKL, pixels: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> float:
    """Fit the VAE to the digits; returns the final reconstruction MSE (on the [-1, 1] scale)."""
    import torch
    import torch.nn.functional as F

    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.vae_steps, cfg.warmup_steps))
    recent: list[float] = []
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(pixels), (cfg.vae_batch,), generator=generator)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec_loss = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = [*recent[-49:], rec_loss.item()]
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log.info("vae step %d/%d  mse %.4f  kl %.3f", step, cfg.vae_steps, np.mean(recent), kl.item())
    vae.eval()
    return float(np.mean(recent))


def normalise_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Encode every digit (posterior mean) and set the VAE's scale/shift so the latents have unit variance."""
    import torch

    with torch.no_grad():
        mean = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    shift, scale = mean.mean().item(), 1.0 / mean.std().item()
    # FluxPipeline decodes `latents / scaling_factor + shift_factor`, the inverse of this.
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return (mean - shift) * scale


class _Ema:
    """Exponential moving average of trainable weights; sampling with it is markedly less noisy."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    def update(self, step: int) -> None:
        import torch

        # Warm-up of the decay so early, random weights leave the average quickly.
        decay = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def copy_to_params(self) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)


def train_flow(
    pipe: FluxPipeline,
    latents: torch.Tensor,
    labels: np.ndarray,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> list[float]:
    """Rectified flow: x_σ = (1-σ)·x0 + σ·ε, the transformer predicts ε - x0 (FluxPipeline's sign and
    σ = timestep/1000 convention). Both text encoders train jointly with the transformer."""
    import torch

    rng = random.Random(cfg.seed)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for module in modules:
        module.train()
    params = [p for module in modules for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.flow_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.flow_steps, cfg.warmup_steps))
    ema = _Ema(params, cfg.ema_decay)

    batches = FlowBatches.of(
        pipe, latents, labels, cfg.flow_batch, cfg.prompt_repeats, cfg.uncond_prob, cfg.sigma_one_prob
    )
    history: list[float] = []
    recent: list[float] = []
    for step in range(cfg.flow_steps):
        loss = batches.loss(rng, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        recent = [*recent[-(cfg.log_every - 1) :], loss.item()]
        if step % cfg.log_every == 0 or step == cfg.flow_steps - 1:
            history.append(float(np.mean(recent)))
            log.info(
                "flow step %d/%d  loss %.4f  lr %.2e",
                step,
                cfg.flow_steps,
                history[-1],
                sched.get_last_lr()[0],
            )
    ema.copy_to_params()
    for module in modules:
        module.eval()
    return history


class OutDirError(ValueError):
    """The output folder is one training must not replace (it would be deleted); checked before training."""


def _staging_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".tmp")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder whose replacement would delete something that is not a saved pipeline.

    Saving removes `out_dir` and its staging folder `<out_dir>.tmp`: each must be absent, empty or a pipeline
    (model_index.json inside; for the staging folder, also the parts of a save cut short)."""
    if out_dir.name in ("", ".", ".."):
        raise OutDirError(f"--out needs a folder name, got {str(out_dir)!r}")
    for folder, partial_ok in ((out_dir, False), (_staging_dir(out_dir), True)):
        if not folder.exists() and not folder.is_symlink():
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise OutDirError(f"--out: {folder} exists and is not a folder; training will not replace it")
        entries = {entry.name for entry in folder.iterdir()}
        if not entries or "model_index.json" in entries or (partial_ok and entries <= PIPELINE_ENTRIES):
            continue
        raise OutDirError(
            f"--out: {folder} is a non-empty folder without model_index.json; training would delete it. "
            "Give a new or empty folder, or an earlier output of train-digits."
        )


def train(
    cfg: TrainConfig | None = None, out_dir: Path = PIPELINE_DIR, save_records: bool = True
) -> dict[str, Any]:
    """Train the classifier, the VAE and the flow model; save the pipeline with `save_pretrained`.
    `save_records` writes the classifier's record beside the package's model (off for experiments)."""
    import torch

    from diffuserve.models.tiny_flux import build_tiny_flux

    check_out_dir(out_dir)  # before minutes of training, not after
    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()

    classifier = train_classifier()
    log.info("classifier held-out accuracy %.4f", classifier.held_out_accuracy)
    if save_records:
        save_classifier(classifier)

    ink, labels = load_digits_ink()
    pixels = torch.from_numpy(ink_to_pixels(ink))
    pipe = build_tiny_flux(cfg.model, seed=cfg.seed, words=DIGITS_VOCAB_WORDS)
    generator = torch.Generator().manual_seed(cfg.seed)

    vae_mse = train_vae(pipe.vae, pixels, cfg, generator)
    latents = normalise_latents(pipe.vae, pixels)
    vae_done = time.perf_counter()
    history = train_flow(pipe, latents, labels, cfg, generator)
    flow_done = time.perf_counter()

    # Save beside, then swap, so an interrupted run never leaves a half-written model in the package.
    check_out_dir(out_dir)  # again: the folders may have changed during training
    tmp_dir = _staging_dir(out_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pipe.save_pretrained(str(tmp_dir), safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)

    record: dict[str, Any] = {
        "config": asdict(cfg),
        "classifier_held_out_accuracy": classifier.held_out_accuracy,
        "vae_final_mse": vae_mse,
        "flow_loss_history": history,
        "vae_seconds": round(vae_done - started, 1),
        "flow_seconds": round(flow_done - vae_done, 1),
        "train_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
        },
    }
    log.info("saved %s after %.0f s", out_dir, record["train_seconds"])
    return record


def train_and_evaluate(
    cfg: TrainConfig | None = None, out_dir: Path = PIPELINE_DIR, eval_seeds: int = 20
) -> tuple[dict[str, Any], EvalResult | None]:
    """Train, then measure prompt following at the serving defaults. Training into the package also
    writes `training.json` (config, losses, timings, accuracy) so the committed model documents itself."""
    from diffusers import FluxPipeline

    from diffuserve.models.digits.classifier import load_classifier
    from diffuserve.models.digits.evaluate import evaluate

    in_package = out_dir.resolve() == PIPELINE_DIR.resolve()
    record = train(cfg, out_dir, save_records=in_package)
    result = None
    if eval_seeds > 0:
        # The package's run just wrote the classifier record; loading it also proves the refit matches.
        classifier = load_classifier() if in_package else train_classifier()
        result = evaluate(FluxPipeline.from_pretrained(str(out_dir)), classifier, seeds=range(eval_seeds))
        record["evaluation"] = result.to_dict()
    if in_package:
        TRAINING_RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return record, result
