"""Shared fixtures: one real server on the default built-in model, for the tests that need a real socket (the
tutorial's curl and SDK calls, the playground in a browser)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.helpers import ServerHandle, start_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """The default model, batches up to 8, a short batch window so concurrent requests share batches; its
    image store in a temporary folder rather than the user's cache."""
    store = tmp_path_factory.mktemp("image-store")
    with start_server(
        MODEL_BATCH="8", BATCH_WAIT_MS="20", LOG_FORMAT="json", IMAGE_STORE_DIR=str(store)
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for a module's in-process engines: steadier on 2 cores, and the worker's own setting."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
