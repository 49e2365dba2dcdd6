"""The digits model's shipped "mirror" LoRA: its file's layout, its effect as the criterion measures it, its trainer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffuserve.cli import main
from diffuserve.engine.lora.targets import lora_targets
from diffuserve.loras.files import read_header, read_layout
from diffuserve.models.digits.classifier import load_classifier
from diffuserve.models.digits.lora_evaluate import (
    drawn_as_written,
    drawn_mirrored,
    generate,
    generate_pairs,
    measure,
    mirror_holds,
)
from diffuserve.models.digits.lora_train import MIRROR_RECORD, MIRROR_WEIGHTS, LoraTrainConfig, train_mirror
from diffuserve.models.registry import BUILTIN_MODELS

# Seeds the shipped adapter's record (evaluated on 0..19) never saw.
SEEDS = range(100, 104)
KEY = re.compile(r"transformer\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")


@pytest.fixture(scope="module")
def pipe():
    # One thread: on a busy 2-core runner a second OpenMP thread mostly waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipeline = BUILTIN_MODELS["digits"]()
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def pairs(pipe):
    return generate_pairs(pipe, MIRROR_WEIGHTS, SEEDS)


def test_shipped_file_is_a_small_transformer_only_peft_adapter(pipe):
    with safe_open(str(MIRROR_WEIGHTS), framework="pt") as file:
        keys = list(file.keys())
    matches = [KEY.fullmatch(key) for key in keys]
    assert all(matches), [key for key, m in zip(keys, matches, strict=True) if m is None]
    modules = {m["module"] for m in matches if m}
    assert len(keys) == 2 * len(modules)
    # Exactly the layers the server adapts: every block linear but the AdaLN modulation ones.
    assert modules == set(lora_targets(pipe.transformer))
    assert not any(".norm" in name for name in modules)
    _, metadata, _ = read_header(MIRROR_WEIGHTS)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 4)
    layout = read_layout(MIRROR_WEIGHTS, check_values=True)
    assert layout.rank == 4 and {module.scale for module in layout.modules.values()} == {1.0}
    assert MIRROR_WEIGHTS.stat().st_size < 256 * 1024


def test_shipped_record_documents_the_file():
    record = json.loads(MIRROR_RECORD.read_text())
    assert record["weights_bytes"] == MIRROR_WEIGHTS.stat().st_size
    assert record["evaluation"]["mirror_holds"] is True
    assert record["config"]["rank"] == record["lora_config"]["r"]


def test_adapter_draws_mirrored_digits_and_the_base_does_not(pairs, classifier):
    base, adapted, digits = pairs
    assert len(digits) == 40
    assert drawn_as_written(base, digits, classifier)
    assert not drawn_mirrored(base, digits, classifier)
    assert drawn_mirrored(adapted, digits, classifier)
    assert not drawn_as_written(adapted, digits, classifier)
    assert mirror_holds(measure(base, adapted, digits, classifier))
    # No adapter: the same images on both sides are not the base drawings' mirrors.
    assert not mirror_holds(measure(base, base, digits, classifier))


def test_unloading_restores_the_base_model(pipe, pairs):
    base, _, _ = pairs
    again, _ = generate(pipe, SEEDS[:1])
    for first, second in zip(base[:10], again, strict=True):
        assert np.array_equal(np.asarray(first), np.asarray(second))


def test_train_digits_lora_command_trains_saves_evaluates_and_reproduces(tmp_path, capsys):
    threads = torch.get_num_threads()
    out, again = tmp_path / "cli", tmp_path / "again"
    try:
        code = main(
            ["train-digits-lora", "--steps", "2", "--rank", "2", "--out", str(out), "--eval-seeds", "1"]
        )
        # The same settings through the function: the same bytes (seeded, one thread, sorted metadata).
        train_mirror(LoraTrainConfig(steps=2, rank=2, lora_alpha=2), again, eval_seeds=0)
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert "mirror criterion" in capsys.readouterr().out
    weights = out / "mirror.safetensors"
    layout = read_layout(weights, check_values=True)
    assert layout.rank == 2
    assert set(layout.modules) == set(read_layout(MIRROR_WEIGHTS).modules)
    assert (again / "mirror.safetensors").read_bytes() == weights.read_bytes()
    record = json.loads((out / "mirror.json").read_text())
    assert record["config"]["steps"] == 2 and record["evaluation"]["generations"] == 10
    assert not list(out.glob(".*.tmp"))
