"""Diffusers pipelines (and adapter files) from the Hugging Face hub into its cache ahead of loading: only the
files a pipeline needs, with progress, resuming partial files, checked loadable, each failure one line
(PullError)."""

from diffuserve.hub.cache import cache_dir, cached_snapshot, hub_endpoint, is_cached
from diffuserve.hub.download import pull, pull_adapter
from diffuserve.hub.failures import PullError
from diffuserve.hub.files import missing_files, pipeline_components, select_files
from diffuserve.hub.progress import DownloadCancelled, PullProgress, format_progress, log_progress

__all__ = [
    "DownloadCancelled",
    "PullError",
    "PullProgress",
    "cache_dir",
    "cached_snapshot",
    "format_progress",
    "hub_endpoint",
    "is_cached",
    "log_progress",
    "missing_files",
    "pipeline_components",
    "pull",
    "pull_adapter",
    "select_files",
]
