"""Random-weight builders of every family's real architecture: parameter counts against the released configs and
the announced figures (built on the meta device: no memory, seconds on a CPU), repo ids, offline tokenizers."""

from __future__ import annotations

import pytest
import torch

from diffuserve.models.random_weights import (
    EXPECTED_PARAMS,
    PUBLISHED_PARAMS,
    RELEASED_REPOS,
    arch_for_repo,
    build_random_pipeline,
    count_params,
    param_report,
)
from diffuserve.models.tokenizer import build_qwen_tokenizer, build_vocab

REPOS = RELEASED_REPOS
PIPELINES = {
    "flux-kontext": "FluxKontextPipeline",
    "flux2-klein": "Flux2KleinPipeline",
    "sd35-large": "StableDiffusion3Pipeline",
    "sd35-medium": "StableDiffusion3Pipeline",
    "qwen-image": "QwenImagePipeline",
    "qwen-image-edit": "QwenImageEditPipeline",
    "z-image-turbo": "ZImagePipeline",
}


@pytest.mark.parametrize("arch", list(PIPELINES))
def test_full_size_architectures_have_the_released_parameter_counts(arch: str) -> None:
    pipe = build_random_pipeline(REPOS[arch], device="meta", dtype=torch.bfloat16)
    assert type(pipe).__name__ == PIPELINES[arch]
    report = param_report(pipe, arch)
    assert all(ok for _, _, ok in report.values()), report
    denoiser = pipe.transformer
    assert denoiser.dtype == torch.bfloat16
    assert pipe.scheduler.sigmas.dtype == torch.float32  # schedulers are built outside the bf16 context
    if arch in PUBLISHED_PARAMS:
        # The count rounds to the announced figure at the precision it is given (8.1 B: ±0.05 B; 20 B: ±0.5 B).
        figure, _source = PUBLISHED_PARAMS[arch]
        decimals = len(figure.partition(".")[2])
        assert abs(count_params(denoiser) / 1e9 - float(figure)) <= 0.5 * 10**-decimals, figure


def test_every_family_is_named_by_its_repo_ids_and_others_are_refused() -> None:
    for arch, repo in REPOS.items():
        assert arch_for_repo(repo) == arch
        assert arch in EXPECTED_PARAMS
    assert arch_for_repo("Qwen/Qwen-Image-Edit-2509") == "qwen-image-edit"
    with pytest.raises(ValueError, match=r"Tongyi-MAI/Z-Image-Turbo") as refused:
        arch_for_repo("some/video-model")
    assert all(repo in str(refused.value) for repo in REPOS.values())


def test_the_qwen_tokenizer_gives_the_template_prefixes_the_pipelines_drop() -> None:
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    tokenizer = build_qwen_tokenizer(build_vocab())
    # The pipelines drop their system prompt's tokens by count (34 and 64 with Qwen's real tokenizer).
    for pipeline, dropped in ((QwenImagePipeline, 34), (QwenImageEditPipeline, 64)):
        template = _template(pipeline)
        prefix = template.split("{}")[0].split("<|vision_start|>")[0]
        assert len(tokenizer(prefix)["input_ids"]) == dropped
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a fox"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert chat == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer(["a fox"], padding="max_length", max_length=512)["input_ids"][0]
    assert len(ids) == 512 and max(ids) < 151936


def _template(pipeline: type) -> str:
    """The prompt template a Qwen pipeline sets in its constructor (read from its source: no model needed)."""
    import inspect
    import re

    found = re.search(r'self\.prompt_template_encode = "(.*?)"\n', inspect.getsource(pipeline.__init__))
    assert found is not None
    return found.group(1).encode().decode("unicode_escape")
