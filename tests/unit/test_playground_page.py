"""The playground's routes without workers: what `/` serves, its size, its no-auth rule and its off switch."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from diffuserve.api.app import build_app
from diffuserve.api.routes.playground import ASSETS, STATIC_DIR
from diffuserve.config import Settings

KEY = "sk-playground-test-key"
MAX_PAGE_BYTES = 100_000


def client(**settings: object) -> TestClient:
    # No `with`: the lifespan (and so the workers) never starts; these routes need neither.
    return TestClient(build_app(Settings(**settings)))  # type: ignore[arg-type]


def page_assets(html: str) -> list[str]:
    """Every file the page links to (stylesheet, script, icon), as written in its src/href attributes."""
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_page_and_its_files_are_served_with_a_strict_policy() -> None:
    http = client()
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert http.get("/playground").content == page.content
    # The page links every file the route serves, and each comes with its type, byte for byte.
    assert sorted(page_assets(page.text)) == sorted([f"playground/{name}" for name in ASSETS] + ["data:,"])
    for name, kind in ASSETS.items():
        response = http.get(f"/playground/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == kind
        assert response.content == (STATIC_DIR / name).read_bytes()


def test_page_loads_nothing_from_elsewhere_and_stays_small() -> None:
    http = client()
    html = http.get("/").text
    total = len(html.encode())
    for link in page_assets(html):
        if link.startswith("data:"):
            continue
        # Relative links only: the page works behind a front that mounts it under any prefix, and offline.
        assert not re.match(r"^([a-z]+:|//|/)", link), link
        response = http.get(f"/{link}")
        assert response.status_code == 200, link
        total += len(response.content)
    assert total < MAX_PAGE_BYTES, total
    for name in ASSETS:
        if name.endswith(".js"):
            script = (STATIC_DIR / name).read_text()
            assert not re.search(r"https?://", script), f"{name} must only call this server's own routes"


def test_page_needs_no_key_and_names_nothing_of_the_server() -> None:
    http = client(api_keys=[KEY], models=["digits"], model_name="private-model-name")
    page = http.get("/")
    assert page.status_code == 200
    # Byte for byte the files on disk: nothing of the server (model, keys, settings) is filled in.
    assert page.content == (STATIC_DIR / "index.html").read_bytes()
    assert b"private-model-name" not in page.content
    # The API behind it still needs the key.
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("path", ["/", "/playground", "/playground/playground.js"])
def test_playground_off_leaves_an_api_only_server(path: str) -> None:
    http = client(playground=False)
    response = http.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_unknown_playground_files_are_404() -> None:
    http = client()
    for path in ("/playground/index.html.bak", "/playground/..%2Fconfig.py", "/playgroundx"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_model_card_extensions_are_null_until_the_model_loads() -> None:
    card = client().get("/v1/models").json()["data"][0]
    for name in ("supports_negative_prompt", "default_size", "default_steps", "default_guidance"):
        assert name in card and card[name] is None
