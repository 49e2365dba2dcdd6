"""The job manager's parts on their own: the priority gate under cancellation, and which webhook addresses are
refused at submission."""

from __future__ import annotations

import asyncio

import pytest

from diffuserve.errors import InvalidRequest
from diffuserve.serving.jobs.gate import PriorityGate
from diffuserve.serving.jobs.webhooks import Delivery, check_url
from diffuserve.serving.priorities import PriorityRules
from diffuserve.types import Priority

CLASSES = {priority.level: priority for priority in Priority}


async def test_cancelling_every_holder_and_waiter_at_once_raises_only_cancellation() -> None:
    """A server stopping cancels all jobs in one pass: holders release (waking waiters) while the waiters are
    being cancelled; each task must end cancelled, never with another error (it would be recorded failed)."""
    gate = PriorityGate(lambda: 2)

    async def job(level: int) -> None:
        async with gate.slot(CLASSES[level], gate.next_ticket()):
            await asyncio.sleep(3600)

    tasks = [asyncio.create_task(job(level)) for level in (0, 0, 1, 0, 2)]
    await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes), outcomes
    entered = []

    async def probe(name: str) -> None:
        async with gate.slot(Priority.BATCH, gate.next_ticket()):
            entered.append(name)

    await asyncio.wait_for(asyncio.gather(probe("a"), probe("b"), probe("c")), 1)
    assert sorted(entered) == ["a", "b", "c"], "the gate is empty again"


async def test_the_gate_lets_higher_levels_in_first_and_weighs_images() -> None:
    gate = PriorityGate(lambda: 4)
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str, level: int, weight: int) -> None:
        async with gate.slot(CLASSES[level], gate.next_ticket(), weight):
            order.append(name)
            await release.wait()

    holder = asyncio.create_task(job("holder", 0, 4))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(job(n, lvl, w)) for n, lvl, w in (("b1", 0, 2), ("i", 2, 3), ("b2", 0, 1))]
    await asyncio.sleep(0.01)
    assert [gate.position(Priority.INTERACTIVE, 2), gate.position(Priority.BATCH, 1)] == [0, 1]
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, *waiters), 1)
    assert order == ["holder", "i", "b1", "b2"]


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1", "0x7f.1", "2130706433", "0", "10.1.2.3", "169.254.169.254", "localhost",
     "[::1]", "[::ffff:10.0.0.1]", "[64:ff9b::a00:1]", "[2002:a00:1::]", "[fe80::1]"],
)  # fmt: skip
def test_non_public_webhook_hosts_are_refused_at_submission(host: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_url(f"http://{host}/hook", allow_private=False)
    assert refused.value.param == "webhook_url"
    check_url(f"http://{host}/hook", allow_private=True)  # allowed on purpose: accepted


def test_public_hosts_pass_and_a_failed_lookup_is_retried_but_a_refusal_is_not() -> None:
    for url in ("https://8.8.8.8/hook", "https://example.com:8443/a?b=c", "http://[2001:4860:4860::8888]/"):
        check_url(url, allow_private=False)
    assert Delivery(None, "cannot resolve example.invalid: [Errno -3]").retry
    assert not Delivery(None, "refused: example.com resolves to a non-public address").retry
    assert Delivery(503).retry and Delivery(429).retry and not Delivery(410).retry and Delivery(204).delivered


async def test_jobs_waiting_in_the_gate_age_into_higher_classes() -> None:
    now = [0.0]
    gate = PriorityGate(lambda: 1, PriorityRules(aging_s=10.0), clock=lambda: now[0])
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str, level: int) -> None:
        async with gate.slot(CLASSES[level], gate.next_ticket()):
            order.append(name)
            if name == "holder":
                await release.wait()

    holder = asyncio.create_task(job("holder", 2))
    await asyncio.sleep(0)
    old = asyncio.create_task(job("old batch", 0))
    await asyncio.sleep(0)
    now[0] = 25.0  # two classes up: as high as the interactive job behind it, and first come
    new = asyncio.create_task(job("new interactive", 2))
    await asyncio.sleep(0.01)
    assert gate.position(Priority.INTERACTIVE, 2) == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, old, new), 1)
    assert order == ["holder", "old batch", "new interactive"]
