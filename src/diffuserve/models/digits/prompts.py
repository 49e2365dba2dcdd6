"""Prompt phrasings that name a digit, for training (randomised) and evaluation (a fixed, readable set)."""

from __future__ import annotations

import random
import string

from diffuserve.models.tokenizer import BASE_WORDS, NUMBER_WORDS

# Words the digits tokenizers know beyond the base list, so common phrasings do not collapse to <unk>.
EXTRA_WORDS = [
    "figure", "character", "symbol", "sign", "digits", "numbers", "is", "it", "with", "and", "my", "your",
    "for", "this", "that", "generate", "create", "make", "render", "paint", "painted", "pen", "pencil",
    "ink", "scribbled", "scan", "scanned", "single", "looks", "like", "by",
    ".", ",", "!", "?", ":", "-", "'", '"',
]  # fmt: skip
DIGITS_VOCAB_WORDS = list(dict.fromkeys([*BASE_WORDS, *EXTRA_WORDS]))

# `{n}` is replaced by the digit as a numeral or a word, chosen at random in training.
TRAIN_TEMPLATES = [
    "{n}",
    "the digit {n}",
    "digit {n}",
    "a digit {n}",
    "the number {n}",
    "number {n}",
    "numeral {n}",
    "the numeral {n}",
    "a {n}",
    "a handwritten {n}",
    "handwritten {n}",
    "a hand written {n}",
    "a handwritten digit {n}",
    "the handwritten number {n}",
    "a drawing of the digit {n}",
    "a picture of the number {n}",
    "an image of a handwritten {n}",
    "a sketch of a {n}",
    "draw the digit {n}",
    "write the number {n}",
    "show me a {n} please",
    "please draw a {n}",
    "a {n} written in ink",
    "a black {n} on white",
    "a small handwritten {n}",
    "a bold {n}",
    "a thin {n}",
    "{n}, handwritten",
    "the digit {n} in pen",
    "a scanned handwritten {n}",
    "generate a handwritten {n}",
    "the symbol {n}",
]
# Prompts that name no digit; the model learns to draw some digit for them.
UNCONDITIONAL_PROMPTS = ["", "a digit", "a handwritten digit", "a number", "handwritten", "a drawing"]

# The evaluation cycles through these, so every reported accuracy covers numerals and words alike.
EVAL_PHRASINGS = [
    "the digit {numeral}",
    "a handwritten {word}",
    "number {numeral}",
    "{numeral}",
    "{word}",
    "a picture of the number {word}",
    "draw a {numeral}",
    "the handwritten digit {word}",
]

FILLER_WORDS = ["please", "style", "image", "small", "big", "white", "black", "on", "in", "thin", "bold"]


def digit_prompt(digit: int, phrasing: str) -> str:
    return phrasing.format(numeral=str(digit), word=NUMBER_WORDS[digit])


def eval_prompt(digit: int, index: int) -> str:
    """The evaluation prompt for one (digit, seed index): phrasings rotate with the index."""
    return digit_prompt(digit, EVAL_PHRASINGS[index % len(EVAL_PHRASINGS)])


def _unknown_word(rng: random.Random) -> str:
    # Letters only: a made-up word is always <unk>, and can never smuggle in a numeral.
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) + "q"


def random_prompt(digit: int, rng: random.Random) -> str:
    """A training prompt for `digit`: random template, numeral or word, case, and noise words."""
    name = str(digit) if rng.random() < 0.5 else NUMBER_WORDS[digit]
    case = rng.random()
    if case < 0.1:
        name = name.upper()
    elif case < 0.25:
        name = name.capitalize()
    words = rng.choice(TRAIN_TEMPLATES).format(n=name).split(" ")
    # Unknown and filler words anywhere, so they are tolerated rather than guessed at.
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2, 3])):
        noise = _unknown_word(rng) if rng.random() < 0.6 else rng.choice(FILLER_WORDS)
        words.insert(rng.randint(0, len(words)), noise)
    prompt = " ".join(words)
    if rng.random() < 0.15:
        prompt += rng.choice([".", "!", " please", ", please"])
    if rng.random() < 0.1:
        prompt = prompt.capitalize()
    return prompt


def random_unconditional_prompt(rng: random.Random) -> str:
    prompt = rng.choice(UNCONDITIONAL_PROMPTS)
    if rng.random() < 0.3:
        prompt = f"{prompt} {_unknown_word(rng)}".strip()
    return prompt
