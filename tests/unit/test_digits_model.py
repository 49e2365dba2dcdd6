"""The built-in digits model: it follows prompts, its judge is sound, and training encodes text as serving does."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuserve.models.digits.classifier import load_classifier
from diffuserve.models.digits.data import images_to_ink, ink_to_features, ink_to_pixels, load_digits_ink
from diffuserve.models.digits.evaluate import evaluate, parse_seeds
from diffuserve.models.digits.flow import MAX_SEQUENCE_LENGTH, encode_prompts
from diffuserve.models.digits.prompts import (
    DIGITS_VOCAB_WORDS,
    EVAL_PHRASINGS,
    TRAIN_TEMPLATES,
    digit_prompt,
    random_prompt,
)
from diffuserve.models.digits.train import DIGITS_MODEL, PIPELINE_DIR, OutDirError, check_out_dir
from diffuserve.models.registry import BUILTIN_MODELS
from diffuserve.models.tokenizer import NUMBER_WORDS, UNK_ID
from diffuserve.types import TINY_FLUX


@pytest.fixture(scope="module")
def pipe():
    # One thread: on a busy 2-core runner a second OpenMP thread mostly waits (measured 6× slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipeline = BUILTIN_MODELS["digits"]()
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _generate(pipe, prompts: list[str], seeds: list[int]):
    return pipe(
        prompt=prompts,
        num_inference_steps=TINY_FLUX.default_steps,
        guidance_scale=TINY_FLUX.default_guidance,
        max_sequence_length=TINY_FLUX.max_sequence_length,
        height=TINY_FLUX.native_size,
        width=TINY_FLUX.native_size,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="pil",
    ).images


def test_prompt_following_accuracy_over_200_generations(pipe, classifier) -> None:
    result = evaluate(pipe, classifier, seeds=range(20))
    assert result.total == 200
    assert result.accuracy >= 0.85, result.report()


def test_classifier_is_accurate_on_held_out_real_digits(classifier) -> None:
    assert classifier.held_out_accuracy >= 0.97
    assert classifier.test_size >= 400


def test_classifier_reads_real_digits_through_the_image_path(classifier) -> None:
    # Real digits rendered as the pipeline renders images (RGB, dark ink) must survive the PIL round trip.
    from PIL import Image

    ink, labels = load_digits_ink()
    pixels = ink_to_pixels(ink[:200])
    images = [
        Image.fromarray(np.round((p.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8), mode="RGB")
        for p in pixels
    ]
    np.testing.assert_allclose(images_to_ink(images), ink[:200], atol=1 / 255)
    assert (classifier.predict_images(images) == labels[:200]).mean() >= 0.97


def test_features_are_sklearn_scale() -> None:
    ink, _ = load_digits_ink()
    features = ink_to_features(ink)
    assert features.shape == (len(ink), 64)
    assert features.min() >= 0.0 and features.max() <= 16.0


def test_a_seed_gives_the_same_digit_alone_or_in_a_batch(pipe, classifier) -> None:
    alone = [_generate(pipe, [f"the digit {d}"], [7])[0] for d in (1, 4, 8)]
    batched = _generate(pipe, ["the digit 1", "the digit 4", "the digit 8"], [7, 7, 7])
    for a, b in zip(alone, batched, strict=True):
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 2  # float reduction order may differ with batch size, never the image
    assert list(classifier.predict_images(alone)) == [1, 4, 8]


def test_unknown_words_and_punctuation_are_tolerated(pipe, classifier) -> None:
    prompts = ["a zorblax seven, please!", "THE DIGIT 3 ~~ ~~", "quux number 5 flibber", "nine."]
    images = _generate(pipe, prompts, [1, 2, 3, 4])
    assert len(images) == 4
    assert (classifier.predict_images(images) == [7, 3, 5, 9]).sum() >= 3


def test_pooled_text_embeddings_identify_the_digit(pipe) -> None:
    # Every phrasing's pooled CLIP vector is nearer its own digit's mean (over the other phrasings)
    # than any other digit's: the identity of the digit is carried by the text encoder, not by chance.
    with torch.no_grad():
        pooled = torch.stack(
            [
                pipe.encode_prompt([digit_prompt(d, p) for p in EVAL_PHRASINGS], max_sequence_length=16)[1]
                for d in range(10)
            ]
        )  # (10 digits, phrasings, dim)
    hits = 0
    for d in range(10):
        for i in range(len(EVAL_PHRASINGS)):
            others = torch.cat([pooled[:, :i], pooled[:, i + 1 :]], dim=1).mean(dim=1)
            hits += int(torch.cdist(pooled[d, i][None], others).argmin().item() == d)
    assert hits >= 0.95 * 10 * len(EVAL_PHRASINGS)


def test_training_encodes_prompts_exactly_as_the_pipeline() -> None:
    from diffuserve.models.tiny_flux import build_tiny_flux

    model = build_tiny_flux(DIGITS_MODEL, seed=3, words=DIGITS_VOCAB_WORDS)
    rng = random.Random(0)
    prompts = [random_prompt(d, rng) for d in range(10)] + ["", "a"]
    with torch.no_grad():
        served_seq, served_pooled, _ = model.encode_prompt(prompts, max_sequence_length=MAX_SEQUENCE_LENGTH)
        trained_seq, trained_pooled = encode_prompts(model, prompts, MAX_SEQUENCE_LENGTH)
    torch.testing.assert_close(trained_seq, served_seq)
    torch.testing.assert_close(trained_pooled, served_pooled)


def test_digit_names_are_in_the_vocabulary(pipe) -> None:
    for d in range(10):
        for name in (str(d), NUMBER_WORDS[d]):
            ids = pipe.tokenizer_2(name).input_ids
            assert UNK_ID not in ids, name
    assert UNK_ID in pipe.tokenizer_2("zorblax seven").input_ids


def test_training_prompts_name_their_digit() -> None:
    rng = random.Random(0)
    for _ in range(500):
        d = rng.randrange(10)
        words = random_prompt(d, rng).lower().replace(",", " ").replace(".", " ").replace("!", " ").split()
        assert str(d) in words or NUMBER_WORDS[d] in words
        named = {w for w in words if w in NUMBER_WORDS or w.isdigit()}
        assert named <= {str(d), NUMBER_WORDS[d]}
    assert all("{n}" in t for t in TRAIN_TEMPLATES)


def test_parse_seeds() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 9,11-12") == [5, 9, 11, 12]
    with pytest.raises(ValueError):
        parse_seeds(" , ")


def test_commands_are_registered() -> None:
    from diffuserve.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "digits", "--per-digit", "3"])
    assert args.per_digit == 3 and callable(args.func)
    assert callable(parser.parse_args(["train-digits", "--flow-steps", "10"]).func)
    assert callable(parser.parse_args(["digits-grid", "--local"]).func)


def test_train_refuses_an_out_folder_it_would_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffuserve.cli import build_parser

    # `train-digits --out docs` used to delete docs/ after training: now it stops before training.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("keep me")
    args = build_parser().parse_args(["train-digits", "--out", str(docs), "--no-eval"])
    assert args.func(args) == 2
    assert "without model_index.json" in capsys.readouterr().err
    assert (docs / "benchmarks.md").read_text() == "keep me"

    with pytest.raises(OutDirError, match="needs a folder name"):
        check_out_dir(Path(""))
    with pytest.raises(OutDirError, match="not a folder"):
        check_out_dir(docs / "benchmarks.md")
    # Its staging folder `<out>.tmp` is deleted too, so it is held to the same rule.
    (tmp_path / "model.tmp").mkdir()
    (tmp_path / "model.tmp" / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match=r"model\.tmp"):
        check_out_dir(tmp_path / "model")


def test_train_accepts_new_empty_and_earlier_output_folders(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    check_out_dir(PIPELINE_DIR)  # the package's own model, replaced by `make train-digits`
    # A save cut short leaves components without model_index.json (written last): that may go.
    (tmp_path / "cut.tmp" / "vae").mkdir(parents=True)
    check_out_dir(tmp_path / "cut")
