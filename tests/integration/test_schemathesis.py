"""schemathesis against the app's /openapi.json, in process on the built-in model: every generated request,
valid or not, gets a non-5xx answer, errors in the OpenAI envelope, responses as the document declares them.

schemathesis' positive_data_acceptance check is left out: the document states each field's own limits,
not the rules between fields that the route enforces with a 400 naming the field (sizes that are multiples
of the model's step, one of size / aspect_ratio / width+height, n within MAX_IMAGES_PER_REQUEST, strict
integers where JSON Schema would take 2.0). negative_data_rejection is left out for multipart forms (edits):
every form value is text, so a value schemathesis means as a boolean or number arrives as valid text."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import negative_data_rejection, positive_data_acceptance
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi

from diffuserve.api.app import build_app
from tests.inprocess import digits_settings

# Examples per operation and mode: about 300 requests in 10 s (hypothesis stops early on simple operations).
EXAMPLES = 100
BUDGET_S = 90


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    """The app, its lifespan run by schemathesis on the event loop it calls the app on (its ASGI client starts
    an app's lifespan at the first request and keeps it); stopped here, workers and all."""
    app = build_app(digits_settings(image_store_dir=str(tmp_path)))
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()


def test_every_generated_request_gets_a_documented_non_5xx_answer(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    deadline = time.monotonic() + 120
    while not app.state.service.ready:  # the worker loads on the app's own loop, in schemathesis' thread
        assert time.monotonic() < deadline, "the worker never became ready"
        time.sleep(0.05)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    for operation in operations:
        for mode in GenerationMode:
            strategy = operation.as_strategy(generation_mode=mode)

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def check(case: schemathesis.Case) -> None:
                response = case.call(timeout=120)
                statuses[response.status_code] += 1
                where = f"{case.method} {case.formatted_path} {case.body!r:.200}"
                assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
                if response.status_code >= 400:
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}, response.text[:300]
                excluded = [positive_data_acceptance]
                if case.media_type == "multipart/form-data":
                    # A form carries text: a "boolean" prompt arrives as the text "false", a valid prompt.
                    excluded.append(negative_data_rejection)
                case.validate_response(response, excluded_checks=excluded)

            try:
                check()
            except Unsatisfiable:
                # An operation without parameters or body has no invalid form to send.
                assert mode is GenerationMode.NEGATIVE, operation.label
    took = time.monotonic() - started
    print(f"schemathesis: {sum(statuses.values())} requests in {took:.0f} s, by status {dict(statuses)}")
    assert took < BUDGET_S
    assert not any(status >= 500 for status in statuses)
    assert statuses[200] > 0 and any(400 <= status < 500 for status in statuses)
