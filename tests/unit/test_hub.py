"""hub.pull against a local stand-in for the hub: file selection, progress, resume, the completeness check and
each failure's one-line message."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffuserve import hub
from diffuserve.commands.pull import ProgressDisplay
from diffuserve.hub import PullError, PullProgress, is_cached, missing_files, pull, select_files
from diffuserve.hub import download as hub_download
from diffuserve.hub import failures as hub_failures
from diffuserve.hub import progress as hub_progress
from tests.fake_hub import FakeHub, serve_fake_hub, tiny_pipeline_folder

REPO = "tiny/flux"
VAE = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pipeline_folder(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def fake_hub(pipeline_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """tiny/flux with junk beside it (a sample image, .bin copies); tiny/gated; tiny/bare without model_index.json;
    tiny/novae whose vae folder has no weights."""
    root = tmp_path_factory.mktemp("repos")
    flux = root / "flux"
    shutil.copytree(pipeline_folder, flux)
    (flux / "sample.png").write_bytes(b"\x89PNG" + bytes(200_000))
    (flux / "README.md").write_text("# tiny flux\n")
    (flux / "vae" / "diffusion_pytorch_model.bin").write_bytes(bytes(50_000))
    (flux / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(bytes(40_000))
    bare = root / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "model.safetensors").write_bytes(bytes(1000))
    novae = root / "novae"
    shutil.copytree(pipeline_folder, novae)
    (novae / VAE).unlink()
    with serve_fake_hub() as server:
        server.add_repo(REPO, flux)
        server.add_repo("tiny/gated", pipeline_folder, gated_token="hf_right")
        server.add_repo("tiny/bare", bare)
        server.add_repo("tiny/novae", novae)
        yield server


@pytest.fixture
def hub_env(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A fresh cache for each test, the library pointed at the fake hub, no token from the machine."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    for name in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Small chunks, so a cut connection leaves bytes on disk to resume from (the library writes 10 MB chunks).
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    fake_hub.reset_counts()
    return fake_hub


def sizes_of(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# -- file selection and the completeness check ---------------------------------------------------------------
def test_select_files_keeps_one_copy_of_each_components_weights() -> None:
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "feature_extractor": [None, None],
    }
    listing = [
        "model_index.json",
        "README.md",
        "sd_xl_base_1.0.safetensors",  # a single-file checkpoint beside the folders
        "01.png",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/openvino_model.xml",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/pytorch_model.bin",
        "text_encoder/flax_model.msgpack",
        "text_encoder/model.onnx",
        "vae/config.json",  # only an fp16 copy: that is what there is
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.bin",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
        "safety_checker/model.safetensors",
    ]
    assert select_files(index, listing) == sorted(
        [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/openvino_model.xml",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "scheduler/scheduler_config.json",
        ]
    )


def test_missing_files_names_what_keeps_a_folder_from_loading(pipeline_folder: Path, tmp_path: Path) -> None:
    assert missing_files(pipeline_folder) == []
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    (folder / VAE).unlink()
    (folder / "scheduler" / "scheduler_config.json").unlink()
    shutil.rmtree(folder / "tokenizer_2")
    # A sharded transformer whose index names a shard that is not there.
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors")
    shard_map = {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}
    shard_map["b"] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": shard_map}
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(missing_files(folder)) == [
        "scheduler/scheduler_config.json",
        "tokenizer_2/",
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/ (no weights)",
    ]
    assert missing_files(tmp_path) == ["model_index.json"]


# -- pulling ------------------------------------------------------------------------------------------------
def test_pull_reports_progress_up_to_the_total_and_fetches_only_the_pipeline(
    hub_env: FakeHub, pipeline_folder: Path
) -> None:
    assert not is_cached(REPO)
    reports: list[PullProgress] = []
    snapshot = pull(REPO, progress=reports.append)

    assert is_cached(REPO) and hub.cached_snapshot(REPO) == snapshot
    assert sizes_of(snapshot) == sizes_of(pipeline_folder)  # no README, sample image, .bin or fp16 copy
    served = {name for (repo, name) in hub_env.served if repo == REPO}
    assert served == set(sizes_of(pipeline_folder))
    total = sum(sizes_of(pipeline_folder).values())
    first = reports[0]  # model_index.json, read to choose the files, is in already
    assert (first.bytes_done, first.bytes_total, first.files_done) == (
        sizes_of(snapshot)["model_index.json"],
        total,
        1,
    )
    assert [r.bytes_done for r in reports] == sorted(r.bytes_done for r in reports)
    last = reports[-1]
    assert (last.bytes_done, last.files_done, last.files_total) == (total, 14, 14) and last.finished
    assert len(reports) < 10  # throttled: at most a few reports a second

    # A second pull finds everything cached: one report, nothing served.
    hub_env.reset_counts()
    again: list[PullProgress] = []
    assert pull(REPO, progress=again.append) == snapshot
    assert not hub_env.served and len(again) == 1 and again[0].finished


def test_a_new_commit_downloads_only_what_changed(
    hub_env: FakeHub, pipeline_folder: Path, tmp_path: Path
) -> None:
    hub_env.add_repo("tiny/moving", pipeline_folder)
    first = pull("tiny/moving")
    changed = tmp_path / "changed"
    shutil.copytree(pipeline_folder, changed)
    config = changed / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("{", '{"shift_terminal": null,', 1))
    hub_env.add_repo("tiny/moving", changed)
    hub_env.reset_counts()
    reports: list[PullProgress] = []
    second = pull("tiny/moving", progress=reports.append)

    assert second != first and hub.cached_snapshot("tiny/moving") == second
    assert set(hub_env.served) == {("tiny/moving", "scheduler/scheduler_config.json")}
    assert reports[-1].bytes_done == reports[-1].bytes_total  # files linked from shared blobs count as done
    assert is_cached("tiny/moving", first.name) and is_cached("tiny/moving")


def test_a_dropped_connection_resumes_within_the_run(hub_env: FakeHub) -> None:
    size = len(hub_env.repos[REPO].files[VAE].data)
    hub_env.drop_after(REPO, VAE, 300_000)
    snapshot = pull(REPO)
    assert (snapshot / VAE).stat().st_size == size
    ranges = [r for repo, name, r in hub_env.ranges if name == VAE]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert hub_env.served[(REPO, VAE)] < size + 300_000  # the rest, not the whole file again


def test_an_interrupted_pull_resumes_its_partial_file(
    hub_env: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_progress, "REPORT_INTERVAL_S", 0.0)
    monkeypatch.setattr(hub_download, "PARALLEL_DOWNLOADS", 1)
    size = len(hub_env.repos[REPO].files[VAE].data)
    trackers: list[hub_progress.ProgressTracker] = []
    real_init = hub_progress.ProgressTracker.__init__

    def recording_init(self: hub_progress.ProgressTracker, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        trackers.append(self)

    monkeypatch.setattr(hub_progress.ProgressTracker, "__init__", recording_init)

    def ctrl_c_mid_vae(progress: PullProgress) -> None:
        if (
            progress.current_file == VAE
            and progress.bytes_done > 400_000
            and not trackers[0].cancelled.is_set()
        ):
            # A real Ctrl-C: the signal, then this download thread holds on until the pull has stopped it.
            os.kill(os.getpid(), signal.SIGINT)
            assert trackers[0].cancelled.wait(10)

    # Python's own Ctrl-C handler, as in a terminal: a process started in the background of a shell (`cmd &`)
    # inherits SIGINT ignored, and Python then installs none.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pull(REPO, progress=ctrl_c_mid_vae)
    finally:
        signal.signal(signal.SIGINT, previous)
    sha = hub_env.repos[REPO].files[VAE].sha256
    part = hub.cache_dir() / "models--tiny--flux" / "blobs" / f"{sha}.incomplete"
    kept = part.stat().st_size
    assert 0 < kept < size and not is_cached(REPO)

    hub_env.reset_counts()
    reports: list[PullProgress] = []
    snapshot = pull(REPO, progress=reports.append)
    assert hub_env.served[(REPO, VAE)] == size - kept
    assert [r for _, name, r in hub_env.ranges if name == VAE] == [f"bytes={kept}-"]
    assert reports[0].bytes_done >= kept  # the part counts as done from the start
    assert not part.exists() and is_cached(REPO)

    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(snapshot)
    assert type(pipeline).__name__ == "FluxPipeline"


def test_a_part_that_does_not_match_the_hub_is_thrown_away(hub_env: FakeHub) -> None:
    sha = hub_env.repos[REPO].files[VAE].sha256
    part = hub.cache_dir() / "models--tiny--flux" / "blobs" / f"{sha}.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"not the vae" * 1000)
    with pytest.raises(PullError, match="does not match the hub's checksum"):
        pull(REPO)
    assert not part.exists()
    assert missing_files(pull(REPO)) == []


def test_offline_answers_from_the_cache_only(hub_env: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PullError, match="HF_HUB_OFFLINE is set"):
        pull(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snapshot = pull(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert pull(REPO) == snapshot


# -- failures, one line each --------------------------------------------------------------------------------
def pull_error(repo: str, **kwargs: Any) -> str:
    with pytest.raises(PullError) as caught:
        pull(repo, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_repo(hub_env: FakeHub) -> None:
    assert "tiny/nope not found on the hub; check the id" in pull_error("tiny/nope")
    assert "no revision 'v9'" in pull_error(REPO, revision="v9")


def test_gated_repo_names_the_token_and_where_to_ask(
    hub_env: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_token = pull_error("tiny/gated")
    assert "HF_TOKEN" in no_token and f"{hub_env.url}/tiny/gated" in no_token and "is gated:" in no_token
    wrong = pull_error("tiny/gated", token="hf_wrong")
    assert "has no access" in wrong and f"{hub_env.url}/tiny/gated" in wrong
    monkeypatch.setenv("HF_TOKEN", "hf_right")
    assert missing_files(pull("tiny/gated")) == []


def test_unreachable_hub(hub_env: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    message = pull_error(REPO)
    assert message.startswith("cannot reach the hub at http://127.0.0.1:9 (HF_ENDPOINT")
    assert "HF_HUB_OFFLINE=1" in message


def test_not_a_pipeline_and_incomplete_pipeline(hub_env: FakeHub) -> None:
    assert "tiny/bare is not a diffusers pipeline (the repo has no model_index.json)" in pull_error(
        "tiny/bare"
    )
    message = pull_error("tiny/novae")
    assert "is not a complete pipeline after download; missing: vae/ (no weights)" in message


def test_disk_full(hub_env: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    assert pull_error(REPO).startswith("disk full: the download needs 0.00")
    # Running out of space during the download says the same in its own words.
    during = hub_failures.explain(
        OSError(errno.ENOSPC, "No space left on device"), REPO, None, token_sent=False
    )
    assert str(during).startswith("disk full while pulling tiny/flux")


# -- showing progress ---------------------------------------------------------------------------------------
def progress_at(done: float, *, finished: bool = False) -> PullProgress:
    return PullProgress(
        repo="org/model",
        bytes_done=int(done),
        bytes_total=24_000_000_000,
        files_done=17 if finished else 3,
        files_total=17,
        current_file="transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        bytes_per_second=118e6,
        eta_seconds=192.0,
    )


def test_progress_line_format() -> None:
    assert hub.format_progress(progress_at(1.2e9), "model") == "model  1.20/24.0 GB  5%  118 MB/s  ETA 3m12s"
    assert hub.format_progress(progress_at(24e9, finished=True)).endswith(
        "24.0/24.0 GB  100%  118 MB/s  done"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_and_lines_elsewhere() -> None:
    terminal = Terminal()
    bar = ProgressDisplay("model", terminal)
    bar(progress_at(1.2e9))
    bar(progress_at(24e9, finished=True))
    text = terminal.getvalue()
    assert text.startswith("\rmodel  1.20/24.0 GB  5%") and text.count("\r") == 2
    # The shorter last line blanks what the longer one left, then the line ends.
    assert text.endswith("100%  118 MB/s  done   \n")

    log = io.StringIO()
    lines = ProgressDisplay("model", log, interval_s=3600)
    for done in (0, 1e9, 2e9):
        lines(progress_at(done))
    lines(progress_at(24e9, finished=True))
    assert log.getvalue().splitlines() == [
        "pulling model  0.00/24.0 GB  0%  118 MB/s  ETA 3m12s  (3/17 files)",
        "pulling model  24.0/24.0 GB  100%  118 MB/s  done  (17/17 files)",
    ]


def test_log_progress_logs_the_first_and_last_report(caplog: pytest.LogCaptureFixture) -> None:
    report = hub.log_progress("schnell", interval_s=3600)
    with caplog.at_level(logging.INFO, logger="diffuserve.hub"):
        for done in (0, 5e9, 10e9):
            report(progress_at(done))
        report(progress_at(24e9, finished=True))
    assert [r.getMessage().split("  ")[1] for r in caplog.records] == ["0.00/24.0 GB", "24.0/24.0 GB"]
