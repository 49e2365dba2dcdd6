"""The README's examples of edits, streamed previews and image URLs, run as printed against a real server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ROOT, start_server

MARKER = "runs this\nblock against a server"


def readme_block() -> str:
    """The Python block that follows the paragraph naming this test."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER) :]
    found = re.search(r"```python\n(.*?)```", after, re.S)
    assert found is not None, "the README's block of edits, streaming and URLs"
    return found.group(1)


def test_the_readme_examples_of_edits_streaming_and_urls_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = readme_block()
    assert "http://127.0.0.1:8000/v1" in code
    with start_server(["digits"]) as server:
        monkeypatch.chdir(tmp_path)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code.replace("http://127.0.0.1:8000", server.base_url), "README.md", "exec"), {})
    assert printed.getvalue().split() == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for name, kind in [
        ("seven.png", "PNG"),
        ("edited.webp", "WEBP"),
        ("image_generation.completed.webp", "WEBP"),
        ("nine.webp", "WEBP"),
    ]:
        with Image.open(tmp_path / name) as image:
            assert image.format == kind and image.size == (32, 32), name
