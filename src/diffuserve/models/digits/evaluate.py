"""Prompt-following accuracy of a digits pipeline: generate digits over many seeds and let the classifier judge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffuserve.models.digits.classifier import DigitClassifier
from diffuserve.models.digits.prompts import EVAL_PHRASINGS, eval_prompt
from diffuserve.types import TINY_FLUX

if TYPE_CHECKING:
    from diffusers import FluxPipeline


@dataclass
class EvalResult:
    seeds: list[int]
    steps: int
    size: int
    # confusion[d, p]: images prompted with digit d that the classifier read as p.
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((10, 10), dtype=np.int64))
    phrasing_hits: dict[str, list[int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(1, self.total))

    def per_digit(self) -> list[float]:
        rows = self.confusion.sum(axis=1)
        return [float(self.confusion[d, d] / max(1, rows[d])) for d in range(10)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "generations": self.total,
            "steps": self.steps,
            "size": self.size,
            "seeds": self.seeds,
            "per_digit": self.per_digit(),
            "per_phrasing": {k: hits / max(1, n) for k, (hits, n) in self.phrasing_hits.items()},
            "confusion": self.confusion.tolist(),
        }

    def report(self) -> str:
        lines = [
            f"prompt-following accuracy: {self.accuracy:.1%} over {self.total} generations "
            f"({len(self.seeds)} seeds × 10 digits, {self.steps} steps, {self.size}×{self.size})",
            "",
            "digit  accuracy  most common reading",
        ]
        for d, acc in enumerate(self.per_digit()):
            read = int(np.argmax(self.confusion[d]))
            lines.append(f"{d:>5}  {acc:>8.0%}  {read}")
        lines += ["", "phrasing                          accuracy"]
        for phrasing, (hits, n) in self.phrasing_hits.items():
            lines.append(f"{phrasing:<32}  {hits / max(1, n):>8.0%}  ({n})")
        lines += ["", "confusion (rows: prompted digit, columns: classifier's reading)"]
        lines.append("     " + " ".join(f"{p:>3}" for p in range(10)))
        for d in range(10):
            lines.append(f"{d:>3}  " + " ".join(f"{v:>3}" for v in self.confusion[d]))
        return "\n".join(lines)


def generate_row(pipe: Any, prompts: list[str], *, seed: int, steps: int, size: int) -> list[Any]:
    """One image per prompt, all from the same seed, with the built-in family's guidance and text length."""
    import torch

    return list(
        pipe(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=TINY_FLUX.default_guidance,
            max_sequence_length=TINY_FLUX.max_sequence_length,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(seed) for _ in prompts],
            output_type="pil",
        ).images
    )


def evaluate(
    pipe: FluxPipeline,
    classifier: DigitClassifier,
    seeds: Sequence[int],
    steps: int | None = None,
    size: int | None = None,
) -> EvalResult:
    """One batch per seed holding the ten digits, one generator per image, as the server would run them.
    The phrasing rotates with the seed's position, so every phrasing is judged on every digit."""
    steps = steps or TINY_FLUX.default_steps
    size = size or TINY_FLUX.native_size
    result = EvalResult(seeds=list(seeds), steps=steps, size=size)
    pipe.set_progress_bar_config(disable=True)
    for index, seed in enumerate(seeds):
        prompts = [eval_prompt(d, index) for d in range(10)]
        images = generate_row(pipe, prompts, seed=seed, steps=steps, size=size)
        predicted = classifier.predict_images(images)
        phrasing = EVAL_PHRASINGS[index % len(EVAL_PHRASINGS)]
        hits = result.phrasing_hits.setdefault(phrasing, [0, 0])
        for d, p in enumerate(predicted):
            result.confusion[d, int(p)] += 1
            hits[0] += int(d == p)
            hits[1] += 1
    return result


def parse_seeds(text: str) -> list[int]:
    """'0-19' or '1,5,9' or '0-9,100' → list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds
