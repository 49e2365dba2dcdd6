"""Locust user for the Images API, configured by BENCH_* env vars: `locust -f src/diffuserve/bench/locustfile.py`.

Example (16 users, 512 requests in all, like the usual hand-edited locust_flux-dev_bs4.py, but configured by env vars):

    BENCH_URL=http://127.0.0.1:8000 BENCH_MODEL=tiny-random-xl-bs4 BENCH_ITERATIONS=512 \\
        locust -f src/diffuserve/bench/locustfile.py --headless -u 16 -r 16 --html report.html --csv stats

Other variables: API_KEY, BENCH_PROMPT, BENCH_PROMPT_FILE, BENCH_SIZE, BENCH_ASPECT_RATIO, BENCH_STEPS,
BENCH_GUIDANCE, BENCH_SEED (unset: random per request), BENCH_N, BENCH_RESPONSE_FORMAT (bytes | b64_json),
BENCH_TIMEOUT. `diffuserve bench` runs this same user class for each step of its sweep.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

from diffuserve.bench.options import GENERATIONS_PATH, LoadOptions, response_problem

OPTIONS = LoadOptions.from_env()
REQUEST_NAME = "generate"


class IterationBudget:
    """Caps the requests of a run across all users; calls `on_finished` once the last one has come back."""

    def __init__(self, total: int, on_finished: Callable[[], Any]) -> None:
        self.total = total
        self.claimed = 0
        self.completed = 0
        self._on_finished = on_finished

    def claim(self) -> bool:
        # Greenlets switch only on I/O, so this check-and-increment cannot interleave.
        if self.claimed >= self.total:
            return False
        self.claimed += 1
        return True

    def release(self) -> None:
        self.completed += 1
        if self.completed == self.total:
            self._on_finished()


class ImageUser(FastHttpUser):
    """Sends generation requests back to back (closed loop): latency under N users is what N clients see."""

    host = OPTIONS.url or None
    wait_time = constant(0)
    # Image requests wait in the server's queue under load; locust's 60 s default would turn that into errors.
    network_timeout = OPTIONS.timeout
    connection_timeout = OPTIONS.timeout
    budget: ClassVar[IterationBudget | None] = None

    def on_start(self) -> None:
        self.rng = random.Random()
        self.request_headers = OPTIONS.headers()

    @task
    def generate(self) -> None:
        budget = type(self).budget
        if budget is not None and not budget.claim():
            raise StopUser()
        try:
            self._send()
        finally:
            if budget is not None:
                budget.release()

    def _send(self) -> None:
        payload = OPTIONS.payload(self.rng)
        with self.client.post(
            GENERATIONS_PATH,
            json=payload,
            headers=self.request_headers,
            name=REQUEST_NAME,
            catch_response=True,
        ) as response:
            if not response.status_code:
                return  # no HTTP answer: locust reports the connection error itself
            problem = response_problem(response.status_code, response.headers, response.content, OPTIONS.n)
            if problem:
                response.failure(problem)
            else:
                response.success()


@events.test_start.add_listener
def _start_budget(environment: Environment, **_: Any) -> None:
    if OPTIONS.iterations is None:
        ImageUser.budget = None
        return
    runner = environment.runner
    options = environment.parsed_options
    # Under `locust -f … --csv`, locust's CSV greenlet writes once a second and stops at quit: give it one more
    # pass so the files hold the final counts. (`diffuserve bench` writes its final CSVs itself.)
    delay = (
        CSV_STATS_INTERVAL_SEC + 0.2 if options is not None and getattr(options, "csv_prefix", None) else 0.0
    )

    def finish() -> None:
        # quit() from a fresh greenlet: the user that finished the budget must not be the one killing itself.
        if runner is not None:
            gevent.spawn_later(delay, runner.quit)

    ImageUser.budget = IterationBudget(OPTIONS.iterations, on_finished=finish)
