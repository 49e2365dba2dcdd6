"""Every served family through the real Engine on a CPU at tier E (its tiny built-in version: the same pipeline
classes, a few small layers): text-to-image with previews, the edit families' edits, the family table's choices,
and the refusals (a non-image pipeline, a tier the family lacks)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from diffuserve.engine.calls import pipeline_kwargs
from diffuserve.engine.engine import Engine
from diffuserve.engine.loader import ModelLoadError, check_tier, detect_family, refuse_non_image
from diffuserve.messages import DeviceBatch, PreviewBatch
from diffuserve.types import FAMILIES, BatchItem, BatchJob, Task, Tier
from tests.helpers import engine_config

# Built-in tiny model → the family it stands for, and whether it edits.
TINY = {
    "tiny-flux-kontext": ("tiny-flux-kontext", True),
    "tiny-sd35": ("tiny-sd35-medium", False),
    "tiny-qwen-image": ("tiny-qwen-image", False),
    "tiny-qwen-image-edit": ("tiny-qwen-image-edit", True),
    "tiny-z-image": ("tiny-z-image-turbo", False),
    "tiny-flux2-klein": ("tiny-flux2-klein", False),
}


@pytest.fixture(scope="module", params=list(TINY))
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    name = request.param
    engine = Engine(engine_config(model_repo=name, model_name=name, tier=Tier.E), "cpu")
    engine.load()
    yield engine


def test_each_family_generates_with_previews(engine: Engine) -> None:
    info = engine.info
    assert info is not None and info.family == TINY[info.name][0]
    size = info.native_width
    items = [BatchItem("a", "a red fox", None, [1, 2], "png", None, partial_images=1)]
    job = BatchJob(1, size, size, 3, info.default_guidance, items)
    taken: list[PreviewBatch] = []
    computed = engine.compute(job, on_preview=taken.append)
    assert isinstance(computed, DeviceBatch), computed
    assert computed.pixels.shape == (2, size, size, 3)
    # Random weights make noise, but finite noise: NaNs would come out as one flat colour.
    assert all(image.std() > 0 for image in computed.pixels.astype(float))
    assert [p.pixels.shape for b in taken for p in b.previews] == [(2, size, size, 3)]
    # Another seed, another image; the same seed, the same image.
    again = engine.compute(BatchJob(2, size, size, 3, info.default_guidance, [items[0]]))
    assert isinstance(again, DeviceBatch) and np.array_equal(again.pixels, computed.pixels)
    assert not np.array_equal(computed.pixels[0], computed.pixels[1])


def test_edit_families_edit_a_picture(engine: Engine) -> None:
    info = engine.info
    assert info is not None
    if not TINY[info.name][1]:
        assert info.edit_tasks == ()
        return
    assert info.edit_tasks == (Task.IMAGE_TO_IMAGE,) and not info.edit_strength
    size = info.native_width
    picture = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    item = BatchItem("e", "make it blue", None, [3], "png", None, init_images=[picture])
    edited = engine.compute(
        BatchJob(3, size, size, 3, info.default_guidance, [item], Task.IMAGE_TO_IMAGE, 0.6)
    )
    assert isinstance(edited, DeviceBatch), edited
    assert edited.pixels.shape == (1, size, size, 3) and edited.pixels.std() > 0


def test_the_family_table_picks_by_class_repo_and_config() -> None:
    assert detect_family("FluxPipeline", "black-forest-labs/FLUX.1-schnell").name == "flux-schnell"
    assert detect_family("FluxPipeline", "my/flux", {"guidance_embeds": True}).name == "flux-dev"
    assert (
        detect_family("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large").name
        == "sd35-large"
    )
    assert detect_family("StableDiffusion3Pipeline", "x/y", {"num_layers": 24}).name == "sd35-medium"
    assert detect_family("QwenImageEditPipeline", "Qwen/Qwen-Image-Edit").text_pipeline == "QwenImagePipeline"
    assert detect_family("PixArtSigmaPipeline", "x/y").name == "generic"
    assert FAMILIES["z-image-turbo"].default_steps == 8 and FAMILIES["z-image-turbo"].default_guidance == 0.0
    for name in ("qwen-image", "z-image-turbo", "flux2-klein"):
        assert not FAMILIES[name].cuda_graphs and FAMILIES[name].tiers == ("E", "XL", "L")


def test_qwen_gets_true_cfg_with_the_cards_empty_negative_prompt() -> None:
    family = FAMILIES["qwen-image"]
    job = BatchJob(1, 64, 64, 2, 4.0, [BatchItem("a", "a fox", None, [1], "png", None)])
    kwargs = pipeline_kwargs(job, family, {"true_cfg_scale", "negative_prompt", "guidance_scale"}, "pt")
    assert kwargs["true_cfg_scale"] == 4.0 and kwargs["negative_prompt"] == [" "]
    assert "guidance_scale" not in kwargs
    kontext = pipeline_kwargs(job, FAMILIES["flux-kontext"], {"guidance_scale", "max_area"}, "pt")
    assert kontext["max_area"] == 64 * 64 and "negative_prompt" not in kontext


def test_non_image_pipelines_and_missing_tiers_are_refused_in_one_line() -> None:
    with pytest.raises(ModelLoadError) as refused:
        refuse_non_image("WanPipeline")
    assert "\n" not in str(refused.value) and "qwen-image (QwenImagePipeline)" in str(refused.value)
    refuse_non_image("PixArtSigmaPipeline")
    with pytest.raises(
        ModelLoadError, match=r"tier M is not available for sd35-large \(its tiers: E, XL, L\)"
    ):
        check_tier(FAMILIES["sd35-large"], "M")
    check_tier(FAMILIES["flux-dev"], "S")


def test_tiers_apply_what_fits_the_family() -> None:
    import torch

    from diffuserve.engine.tiers import apply_recipe, recipe_for
    from diffuserve.models.tiny_families import build_tiny_family

    pipe = build_tiny_family("tiny-sd35")
    notes = apply_recipe(
        pipe, recipe_for(Tier.L), device="cpu", cache_dir="/nonexistent", family=FAMILIES["sd35-large"]
    )
    # SD3 declares no repeated blocks: the family names them, for compile and fp8.
    assert pipe.transformer._repeated_blocks == ["JointTransformerBlock"]
    assert "fused QKV: skipped, not verified for sd35-large" in notes
    notes = apply_recipe(
        pipe, recipe_for(Tier.S), device="cpu", cache_dir="/nonexistent", family=FAMILIES["sd35-large"]
    )
    assert any("step cache: skipped, FLUX.1's alone" in note for note in notes)
    assert torch.isfinite(next(pipe.transformer.parameters())).all()


def test_a_load_out_of_memory_says_what_it_needs_in_one_line() -> None:
    import torch

    from diffuserve.engine.loader import _out_of_memory

    message = _out_of_memory("Qwen/Qwen-Image", "cpu", torch.bfloat16, "random")
    assert message == "model 'Qwen/Qwen-Image' does not fit on cpu: needs ≈ 53.7 GiB, out of memory"
