"""Word-level tokenizers for the built-in models, built in code (no download): a CLIP-style and a T5-style one."""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

# Ids follow T5's convention (pad 0, eos 1, unk 2) so both encoders agree; bos only for the CLIP side.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]
PAD_ID, EOS_ID, UNK_ID, BOS_ID = range(4)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
BASE_WORDS = [
    *NUMBER_WORDS,
    *[str(d) for d in range(10)],
    "digit", "number", "numeral", "handwritten", "hand", "written", "drawn", "a", "an", "the", "of",
    "image", "picture", "photo", "drawing", "sketch", "write", "draw", "show", "me", "please", "black",
    "white", "on", "in", "small", "big", "bold", "thin", "style",
]  # fmt: skip


def build_vocab(words: list[str] | None = None) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words or BASE_WORDS:
        vocab.setdefault(word, len(vocab))
    return vocab


def _base_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Digits split one by one so "37" reads as "3 7"; punctuation never glues onto a word.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return tokenizer


def build_clip_tokenizer(vocab: dict[str, int], max_length: int = 77) -> PreTrainedTokenizerFast:
    tokenizer = _base_tokenizer(vocab)
    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
    )


def build_t5_tokenizer(vocab: dict[str, int], max_length: int = 512) -> PreTrainedTokenizerFast:
    tokenizer = _base_tokenizer(vocab)
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
