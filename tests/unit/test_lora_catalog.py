"""LORA_DIR's files and folders, the adapters read at start, and their cached layouts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from diffuserve.loras import catalog as catalog_module
from diffuserve.loras.catalog import AdapterNotFound, LoraCatalog, hub_ref
from diffuserve.loras.files import AdapterError, AdapterLayout

Q = "transformer_blocks.0.attn.to_q"


def adapter(path: Path, rank: int = 4, module: str = Q) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            f"transformer.{module}.lora_A.weight": np.ones((rank, 8), np.float32),
            f"transformer.{module}.lora_B.weight": np.ones((16, rank), np.float32),
        },
        str(path),
    )
    return path


@pytest.fixture
def loras(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


def test_a_file_named_by_its_stem(loras: Path) -> None:
    path = adapter(loras / "ink.safetensors")
    found = LoraCatalog(str(loras), {}).resolve("ink")
    assert found.name == "ink"
    assert found.layout.path == str(path.resolve())
    assert found.layout.modules[Q].rank == 4


def test_a_file_in_a_subfolder_named_by_its_path(loras: Path) -> None:
    path = adapter(loras / "styles" / "ink.safetensors")
    assert LoraCatalog(str(loras), {}).path_of("styles/ink") == path.resolve()


def test_a_folder_named_for_its_diffusers_default_file(loras: Path) -> None:
    path = adapter(loras / "ink" / "pytorch_lora_weights.safetensors")
    adapter(loras / "ink" / "other.safetensors")
    assert LoraCatalog(str(loras), {}).path_of("ink") == path.resolve()


def test_a_folder_holding_one_adapter_file_names_it(loras: Path) -> None:
    path = adapter(loras / "ink" / "ink_v2.safetensors")
    (loras / "ink" / "README.md").write_text("notes")
    assert LoraCatalog(str(loras), {}).path_of("ink") == path.resolve()


def test_a_folder_of_several_files_needs_a_weight_name(loras: Path) -> None:
    adapter(loras / "ink" / "a.safetensors")
    chosen = adapter(loras / "ink" / "b.safetensors", rank=2)
    catalog = LoraCatalog(str(loras), {})
    with pytest.raises(AdapterNotFound, match="no adapter named 'ink' in LORA_DIR"):
        catalog.path_of("ink")
    found = catalog.resolve("ink", "b.safetensors")
    assert found.name == "ink:b.safetensors"
    assert found.layout.path == str(chosen.resolve())
    assert found.layout.rank == 2


def test_the_file_beside_a_folder_of_the_same_name_comes_first(loras: Path) -> None:
    beside = adapter(loras / "ink.safetensors")
    adapter(loras / "ink" / "pytorch_lora_weights.safetensors")
    assert LoraCatalog(str(loras), {}).path_of("ink") == beside.resolve()


def test_an_unknown_name_is_not_found(loras: Path) -> None:
    adapter(loras / "ink.safetensors")
    catalog = LoraCatalog(str(loras), {})
    with pytest.raises(AdapterNotFound, match="no adapter named 'nope' in LORA_DIR \\(see GET /v1/loras\\)"):
        catalog.resolve("nope")
    with pytest.raises(AdapterNotFound, match=r"no file 'missing\.safetensors' in adapter folder 'ink'"):
        catalog.resolve("ink", "missing.safetensors")


def test_without_lora_dir_only_the_adapters_read_at_start_are_known(tmp_path: Path) -> None:
    path = adapter(tmp_path / "anywhere" / "x.safetensors")
    catalog = LoraCatalog(None, {"ink": str(path), "brush": str(path)})
    assert catalog.enabled
    assert catalog.resolve("ink").layout.path == str(path.resolve())
    with pytest.raises(AdapterNotFound, match="loaded at start: brush, ink; LORA_DIR is not set"):
        catalog.resolve("nope")
    assert not LoraCatalog(None, {}).enabled


def test_an_adapter_read_at_start_wins_over_lora_dir(loras: Path, tmp_path: Path) -> None:
    adapter(loras / "ink.safetensors")
    elsewhere = adapter(tmp_path / "elsewhere.safetensors", rank=2)
    assert LoraCatalog(str(loras), {"ink": str(elsewhere)}).resolve("ink").layout.rank == 2


def test_an_adapter_read_at_start_that_is_gone_cannot_be_read(tmp_path: Path) -> None:
    catalog = LoraCatalog(None, {"gone": str(tmp_path / "gone.safetensors")})
    with pytest.raises(AdapterNotFound, match=r"adapter file 'gone\.safetensors' cannot be read"):
        catalog.resolve("gone")


@pytest.mark.parametrize(
    "name",
    [
        "../outside",
        "/etc/passwd",
        "ink/../../outside",
        "./ink",
        ".hidden",
        "ink/",
        "ink//a",
        "a\\b",
        "ink b",
        "x" * 201,
    ],
)
def test_names_that_are_not_paths_inside_lora_dir_are_refused(loras: Path, name: str) -> None:
    adapter(loras.parent / "outside.safetensors")
    adapter(loras / "ink.safetensors")
    with pytest.raises(AdapterError, match=r"is not an adapter name: .*a path inside LORA_DIR"):
        LoraCatalog(str(loras), {}).resolve(name)


@pytest.mark.parametrize(
    "weight_name", ["../outside.safetensors", "/tmp/x.safetensors", "../../loras/ink.safetensors"]
)
def test_weight_names_that_leave_the_folder_are_refused(loras: Path, weight_name: str) -> None:
    adapter(loras.parent / "outside.safetensors")
    adapter(loras / "ink" / "a.safetensors")
    with pytest.raises(AdapterError, match="is not an adapter name"):
        LoraCatalog(str(loras), {}).resolve("ink", weight_name)


def test_a_link_out_of_lora_dir_is_refused(loras: Path) -> None:
    outside = adapter(loras.parent / "secret" / "pytorch_lora_weights.safetensors")
    (loras / "file.safetensors").symlink_to(outside)
    (loras / "folder").symlink_to(outside.parent, target_is_directory=True)
    catalog = LoraCatalog(str(loras), {})
    for name in ("file", "folder"):
        with pytest.raises(AdapterError, match=f"adapter '{name}' lies outside LORA_DIR"):
            catalog.resolve(name)
    with pytest.raises(AdapterError, match="lies outside LORA_DIR"):
        catalog.resolve("folder", "pytorch_lora_weights.safetensors")


def test_a_link_inside_lora_dir_is_followed(loras: Path) -> None:
    target = adapter(loras / "v2" / "ink.safetensors")
    (loras / "ink.safetensors").symlink_to(target)
    assert LoraCatalog(str(loras), {}).path_of("ink") == target.resolve()


def test_lora_dir_given_through_a_link_resolves(tmp_path: Path, loras: Path) -> None:
    path = adapter(loras / "ink.safetensors")
    (tmp_path / "link").symlink_to(loras, target_is_directory=True)
    assert LoraCatalog(str(tmp_path / "link"), {}).path_of("ink") == path.resolve()


def test_a_layout_is_read_once_while_the_file_is_unchanged(
    loras: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = adapter(loras / "ink.safetensors")
    reads: list[Path] = []
    real = catalog_module.read_layout

    def counted(read: Path, check_values: bool = False) -> AdapterLayout:
        reads.append(read)
        return real(read, check_values)

    monkeypatch.setattr(catalog_module, "read_layout", counted)
    catalog = LoraCatalog(str(loras), {})
    first = catalog.resolve("ink").layout
    assert catalog.resolve("ink").layout is first
    assert reads == [path.resolve()]

    adapter(path, rank=8)  # another size
    assert catalog.resolve("ink").layout.rank == 8
    assert len(reads) == 2


def test_a_file_rewritten_at_the_same_size_is_read_again(loras: Path) -> None:
    path = adapter(loras / "ink.safetensors", module="blocks.0.a")
    catalog = LoraCatalog(str(loras), {})
    assert list(catalog.resolve("ink").layout.modules) == ["blocks.0.a"]
    size, stamp = path.stat().st_size, path.stat().st_mtime_ns
    adapter(path, module="blocks.0.b")
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert path.stat().st_size == size
    assert list(catalog.resolve("ink").layout.modules) == ["blocks.0.b"]


def test_a_file_whose_values_are_not_finite_is_refused(loras: Path) -> None:
    path = loras / "nan.safetensors"
    save_file(
        {
            "a.lora_A.weight": np.full((1, 2), np.nan, np.float32),
            "a.lora_B.weight": np.ones((2, 1), np.float32),
        },
        str(path),
    )
    with pytest.raises(AdapterError, match="not finite"):
        LoraCatalog(str(loras), {}).resolve("nan")


def test_names_lists_those_read_at_start_then_lora_dirs(loras: Path, tmp_path: Path) -> None:
    elsewhere = adapter(tmp_path / "elsewhere.safetensors")
    adapter(loras / "zeta.safetensors")
    adapter(loras / "alpha.safetensors")
    adapter(loras / "folder" / "pytorch_lora_weights.safetensors")
    adapter(loras / "folder" / "extra.safetensors")
    adapter(loras / "single" / "only.safetensors")
    adapter(loras / ".hidden.safetensors")
    adapter(loras / ".cache" / "x.safetensors")
    (loras / "notes.txt").write_text("not an adapter")
    catalog = LoraCatalog(str(loras), {"start": str(elsewhere), "zeta": str(elsewhere)})
    names = catalog.names()
    assert names == ["start", "zeta", "alpha", "folder/extra", "folder", "single/only"]
    for name in names:
        assert catalog.resolve(name).layout.rank == 4


def test_names_without_lora_dir_or_with_a_missing_one(tmp_path: Path) -> None:
    assert LoraCatalog(None, {"a": "/x.safetensors"}).names() == ["a"]
    assert LoraCatalog(str(tmp_path / "missing"), {}).names() == []


@pytest.mark.parametrize(
    ("path", "ref"),
    [
        ("org/repo", ("org/repo", None)),
        ("org/repo:sub/x.safetensors", ("org/repo", "sub/x.safetensors")),
        ("org/repo/sub/x.safetensors", None),  # a missing file, not a repo
        ("loras/style.safetensors", None),
        ("org/repo:x.bin", None),
        ("/abs/x.safetensors", None),
        ("x.safetensors", None),
    ],
)
def test_a_start_path_that_is_no_file_here_and_reads_as_a_repo_is_a_hub_adapter(
    path: str, ref: tuple[str, str | None] | None
) -> None:
    assert hub_ref(path) == ref


def test_a_local_file_wins_over_a_repo_of_the_same_name(loras: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter(loras / "org" / "repo")
    monkeypatch.chdir(loras)
    assert hub_ref("org/repo") is None


def test_a_hub_adapter_is_listed_and_refused_until_pulled(tmp_path: Path) -> None:
    path = adapter(tmp_path / "pulled.safetensors")
    catalog = LoraCatalog(None, {"ink": "org/ink-lora"})
    assert catalog.enabled and catalog.hub == {"ink": ("org/ink-lora", None)}
    assert catalog.names() == ["ink"]
    with pytest.raises(AdapterNotFound, match="still being downloaded from org/ink-lora"):
        catalog.resolve("ink")
    catalog.provide("ink", path)
    assert catalog.resolve("ink").layout.path == str(path)
    assert catalog.names() == ["ink"]
