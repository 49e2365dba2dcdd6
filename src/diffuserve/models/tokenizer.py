"""Word-level tokenizers built in code (no download): CLIP-, T5- and Qwen-style ones with the real padded lengths."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
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


# Qwen's chat markers, atomic as in the real vocabulary; the pipelines pad with <|endoftext|>.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<think>", "</think>",
]  # fmt: skip
# Qwen3's own template, reduced to what the pipelines ask of it: one user turn, the assistant's header, and
# the empty thinking block that `enable_thinking=False` adds (FLUX.2 klein; Z-Image keeps thinking on).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_qwen_tokenizer(vocab: dict[str, int], max_length: int = 131072) -> PreTrainedTokenizerFast:
    """A Qwen-style word-level tokenizer: chat markers atomic, each newline and punctuation mark a token of its
    own (as Qwen's BPE splits them), so a prompt template has the token count the pipelines expect: Qwen-Image
    drops the first 34 tokens of its template, exactly its system prefix."""
    vocab = dict(vocab)
    for token in [*QWEN_SPECIAL_TOKENS, "\n"]:
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            # English contractions and runs of punctuation are one token each, as in Qwen's pre-tokenizer.
            pre_tokenizers.Split(Regex(r"'(?:s|t|re|ve|m|ll|d)|[^\w\s]+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_length,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    return fast
