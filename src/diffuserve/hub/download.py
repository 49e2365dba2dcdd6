"""`pull` and `pull_adapter`: a pipeline's files (or an adapter's file) from the hub into its cache, a few at a time,
resuming parts; a pipeline checked loadable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from diffuserve.hub.cache import cache_dir, cached_snapshot, hub_endpoint, offline
from diffuserve.hub.failures import PullError, explain
from diffuserve.hub.files import missing_files, pipeline_components, select_files
from diffuserve.hub.progress import DownloadCancelled, ProgressTracker, PullProgress

# Files downloaded at once: a big model is a few multi-GB shards, and one HTTP stream rarely fills the link.
PARALLEL_DOWNLOADS = 4
# Above this size a file not stored in LFS still goes through the resumable path.
RESUMABLE_MIN_BYTES = 10 * 1000 * 1000


@dataclass
class _Pull:
    """One pull's context, shared by the download threads."""

    repo: str
    commit: str
    endpoint: str
    cache: Path
    token: str | bool  # False: send none (not even a token saved on disk)
    sizes: dict[str, int]
    sha256: dict[str, str]  # LFS files: their content hash
    tracker: ProgressTracker


def pull(
    repo: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    progress: Callable[[PullProgress], None] | None = None,
) -> Path:
    """Download the diffusers pipeline `repo` (at `revision`, default main) into the hub cache and return its
    snapshot folder, checked loadable. Files already cached are skipped, partial ones resumed. `token` defaults
    to HF_TOKEN (or the token `hf auth login` saved). `progress` gets a PullProgress a few times a second, from
    download threads; an exception it raises stops the pull. Raises PullError with a one-line message."""
    if offline():
        snapshot = cached_snapshot(repo, revision)
        if snapshot is not None and not missing_files(snapshot):
            return snapshot
        raise PullError(
            f"{repo} is not (completely) in the hub cache {cache_dir()} and HF_HUB_OFFLINE is set: "
            "unset HF_HUB_OFFLINE to download it"
        )
    from huggingface_hub import get_token

    sent = token or get_token()
    try:
        return _pull(repo, revision, sent or False, progress)
    except PullError:
        raise
    except Exception as exc:
        raise explain(exc, repo, revision, token_sent=bool(sent)) from exc


def _pull(
    repo: str, revision: str | None, token: str | bool, progress: Callable[[PullProgress], None] | None
) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    endpoint, cache = hub_endpoint(), cache_dir()
    api = HfApi(endpoint=endpoint)
    info = api.model_info(repo, revision=revision, files_metadata=True, token=token)
    siblings = {s.rfilename: s for s in info.siblings or []}
    if "model_index.json" not in siblings:
        raise PullError(f"{repo} is not a diffusers pipeline (the repo has no model_index.json)")
    # Through the library, with the branch name: it records the branch → commit ref that offline loading uses.
    index_path = Path(
        str(
            hf_hub_download(
                repo, "model_index.json", revision=revision, cache_dir=cache, endpoint=endpoint, token=token
            )
        )
    )
    snapshot, commit = index_path.parent, index_path.parent.name
    if commit != info.sha:  # the branch moved between the two calls: list the files of what we got
        info = api.model_info(repo, revision=commit, files_metadata=True, token=token)
        siblings = {s.rfilename: s for s in info.siblings or []}
    try:
        model_index = json.loads(index_path.read_text())
    except ValueError as exc:
        raise PullError(f"{repo}: model_index.json is not valid JSON ({exc})") from exc
    if not isinstance(model_index, dict) or not pipeline_components(model_index):
        raise PullError(f"{repo} is not a diffusers pipeline (its model_index.json names no components)")

    wanted = select_files(model_index, siblings)
    sizes = {name: siblings[name].size or 0 for name in wanted}
    sha256 = {name: lfs.sha256 for name in wanted if (lfs := siblings[name].lfs) is not None}
    todo = [name for name in wanted if not (snapshot / name).exists()]
    # A part left by an earlier run is resumed: it counts as done already.
    parts = {name: _part_size(cache, repo, sha256[name], sizes[name]) for name in todo if name in sha256}
    tracker = ProgressTracker(
        repo,
        progress,
        bytes_total=sum(sizes.values()),
        files_total=len(wanted),
        bytes_done=sum(sizes[n] for n in wanted if n not in todo) + sum(parts.values()),
        files_done=len(wanted) - len(todo),
        parts=parts,
    )
    _check_disk(cache, sum(sizes[n] - parts.get(n, 0) for n in todo))
    tracker.report()  # the first report (and the last, when all is cached); each file's end reports after
    job = _Pull(repo, commit, endpoint, cache, token, sizes, sha256, tracker)
    _download_all(job, sorted(todo, key=lambda n: -sizes[n]))

    missing = missing_files(snapshot)
    if missing:
        raise PullError(
            f"{repo} at {commit[:12]} is not a complete pipeline after download; missing: {', '.join(missing)}"
        )
    return snapshot


# diffusers' file name for an adapter saved with save_lora_weights.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def pull_adapter(
    repo: str,
    filename: str | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    progress: Callable[[PullProgress], None] | None = None,
) -> Path:
    """Download one adapter file of the hub repo `repo` into the hub cache (the same resumable, reported
    download as a pipeline's) and return its path there. Without `filename`: diffusers' default name, else
    the repo's only .safetensors file. Raises PullError with a one-line message."""
    if offline():
        snapshot = cached_snapshot(repo, revision)
        found = snapshot / filename if snapshot is not None and filename else None
        if found is None and snapshot is not None:
            present = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.safetensors")]
            found = snapshot / _adapter_file(repo, present) if present else None
        if found is not None and found.is_file():
            return found
        raise PullError(f"adapter {repo} is not in the hub cache {cache_dir()} and HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi, get_token

    sent = token or get_token() or False
    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(
            repo, revision=revision, files_metadata=True, token=sent
        )
        siblings = {s.rfilename: s for s in info.siblings or []}
        name = filename or _adapter_file(repo, list(siblings))
        if name not in siblings:
            raise PullError(f"{repo} has no file {name!r}")
        sizes = {name: siblings[name].size or 0}
        lfs = siblings[name].lfs
        sha256 = {name: lfs.sha256} if lfs is not None else {}
        cache = cache_dir()
        tracker = ProgressTracker(repo, progress, bytes_total=sizes[name], files_total=1)
        _check_disk(cache, sizes[name])
        # The branch, not the commit: the library records the branch's commit, which offline starts read.
        job = _Pull(repo, revision or "main", hub_endpoint(), cache, sent, sizes, sha256, tracker)
        _download_all(job, [name])
    except PullError:
        raise
    except Exception as exc:
        raise explain(exc, repo, revision, token_sent=bool(sent)) from exc
    snapshot = cached_snapshot(repo, revision)
    if snapshot is None or not (snapshot / name).is_file():
        raise PullError(f"{repo}: {name} is not in the hub cache after its download")
    return snapshot / name


def _adapter_file(repo: str, names: list[str]) -> str:
    if ADAPTER_FILE in names:
        return ADAPTER_FILE
    weights = sorted(name for name in names if name.endswith(".safetensors"))
    if len(weights) == 1:
        return weights[0]
    if not weights:
        raise PullError(f"{repo} holds no .safetensors file: not an adapter repo")
    listed = ", ".join(weights[:4]) + (", …" if len(weights) > 4 else "")
    raise PullError(f"{repo} holds {len(weights)} .safetensors files ({listed}): name one as REPO:FILE")


def _download_all(job: _Pull, names: list[str]) -> None:
    """Download `names` a few at a time; the first failure (or an interrupt) stops the others at their next
    chunk, their parts kept for the next run."""
    if not names:
        return
    pool = ThreadPoolExecutor(max_workers=min(PARALLEL_DOWNLOADS, len(names)), thread_name_prefix="pull")
    futures: list[Future[None]] = []
    try:
        # Submitted inside the try: the first file downloads while the rest are submitted, and an interrupt
        # that lands meanwhile must stop it too.
        futures.extend(pool.submit(_download_one, job, name) for name in names)
        # In short waits: a Ctrl-C that lands in a download thread is handled by the main thread only when it
        # runs again, which an untimed wait would put off until a whole file is done.
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                break
    except BaseException:  # an interrupt: stop every download, even one submitted but not yet listed
        job.tracker.cancelled.set()
        raise
    finally:
        if not all(f.done() for f in futures):  # a failure: stop the rest, keep their parts
            job.tracker.cancelled.set()
        pool.shutdown(wait=True, cancel_futures=True)
    for future in futures:
        error = None if future.cancelled() else future.exception()
        if error is not None and not isinstance(error, DownloadCancelled):
            raise error


def _download_one(job: _Pull, name: str) -> None:
    from huggingface_hub import hf_hub_download

    if name in job.sha256 or job.sizes[name] >= RESUMABLE_MIN_BYTES:
        _download_blob_resumable(job, name)
    # For a file fetched above the library finds its blob and only links it into the snapshot (no bytes).
    hf_hub_download(
        job.repo,
        name,
        revision=job.commit,
        cache_dir=job.cache,
        endpoint=job.endpoint,
        token=job.token,
        tqdm_class=_bar_class(job.tracker, name),
    )
    job.tracker.file_done(name, job.sizes[name])


def _part_path(cache: Path, repo: str, etag: str) -> Path:
    # The name huggingface_hub used for parts until it moved to per-process names it deletes on failure; the
    # cache tools know it, and the library never touches it now.
    return cache / ("models--" + repo.replace("/", "--")) / "blobs" / f"{etag}.incomplete"


def _part_size(cache: Path, repo: str, etag: str, size: int) -> int:
    try:
        done = _part_path(cache, repo, etag).stat().st_size
    except OSError:
        return 0
    return done if done <= size else 0


def _download_blob_resumable(job: _Pull, name: str) -> None:
    """Fetch one big file into the cache's blob store, continuing a part left by an interrupted run.

    huggingface_hub 2.x downloads into a per-process temporary file and deletes it on any failure, so an
    interrupted 10 GB shard starts again from zero; it has no way to resume across runs. This keeps the part
    under a stable name and asks for the rest with an HTTP Range request, through the library's own `http_get`
    (which also retries dropped connections within a run). It goes over HTTP even where the hub stores the
    file with Xet: resuming matters more for multi-GB shards than Xet's faster transfer."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(job.repo, name, revision=job.commit, endpoint=job.endpoint)
    meta = get_hf_file_metadata(url, token=job.token, endpoint=job.endpoint, retry_on_errors=True)
    etag = meta.etag or job.sha256.get(name)
    if not etag:
        return  # nothing to name the blob by: let the library download it its own way
    size = meta.size if meta.size is not None else job.sizes[name]
    folder = "models--" + job.repo.replace("/", "--")
    blob = job.cache / folder / "blobs" / etag
    if blob.exists():
        return
    part = _part_path(job.cache, job.repo, etag)
    lock = job.cache / ".locks" / folder / f"{etag}.lock"  # the lock the library takes for this blob
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():
            return
        resumed = part.stat().st_size if part.exists() else 0
        if resumed > size:  # not a prefix of this file (counted as nothing done)
            part.unlink()
            resumed = 0
        headers = build_hf_headers(token=job.token)
        if urlsplit(meta.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a signed CDN URL: the token stays on the hub
        with part.open("ab") as out:
            http_get(
                meta.location,
                out,
                resume_size=resumed,
                headers=headers,
                expected_size=size,
                displayed_filename=name,
                tqdm_class=_bar_class(job.tracker, name, counted=resumed),
            )
        expected = job.sha256.get(name)
        # Sizes are checked by http_get; a part resumed from another run is also checked by content.
        if resumed and expected and _sha256_of(part) != expected:
            part.unlink()
            raise PullError(
                f"{job.repo}: {name} resumed from an earlier run does not match the hub's checksum; the part "
                "was deleted, run the pull again"
            )
        os.replace(part, blob)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _bar_class(tracker: ProgressTracker, name: str, counted: int = 0) -> Any:
    """A stand-in for the tqdm class the hub library drives per file: its updates go to the tracker. `counted`:
    bytes of a part already counted as done; the library starts its bar at fewer when the server ignored the
    Range request and the file starts again from zero."""

    class _Bar:
        def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
            if initial != counted:
                tracker.add(initial - counted, name)

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            tracker.add(int(n or 0), name)

        def close(self) -> None:
            pass

    return _Bar


def _check_disk(cache: Path, needed: int) -> None:
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise PullError(
            f"disk full: the download needs {needed / 1e9:.2f} GB more, {free / 1e9:.2f} GB are free in {cache}; "
            "free some space or point HF_HOME at a bigger disk"
        )
