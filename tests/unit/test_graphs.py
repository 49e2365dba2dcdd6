"""The CUDA-graph hook's bookkeeping, on CPU with a stand-in for the capture: when a call runs eagerly, is
captured or replayed, what a call's key holds, the bound on kept graphs, and which tiers and workers get graphs."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from diffuserve.engine.tiers import graphs, recipe_for
from diffuserve.types import Tier


class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0, extra: Any = None) -> tuple[torch.Tensor]:
        self.calls += 1
        return (x * 2 * scale,)


class StandInCapture:
    """Runs the forward once on static copies of the inputs, as a capture would record it, and replays it by
    running it again on the copied-in inputs: the bookkeeping around it is what is tested."""

    captured: ClassVar[list[StandInCapture]] = []
    fail: ClassVar[bool] = False

    def __init__(self, forward: Any, args: tuple, kwargs: dict[str, Any], pool: Any) -> None:
        if StandInCapture.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.forward = forward
        self.replays = 0
        StandInCapture.captured.append(self)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        self.replays += 1
        return self.forward(*args, **kwargs)


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Doubler:
    monkeypatch.setattr(graphs, "CapturedCall", StandInCapture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    StandInCapture.captured = []
    StandInCapture.fail = False
    module = Doubler()
    graphs.enable_cuda_graphs(module)
    return module


def test_a_shape_runs_eagerly_once_is_captured_the_second_time_and_replayed_after(model: Doubler) -> None:
    hook = model._diffusers_hook.get_hook(graphs.HOOK_NAME)
    x = torch.ones(2, 3)
    with torch.no_grad():
        outputs = [model(x)[0] for _ in range(4)]
    assert all(torch.equal(out, x * 2) for out in outputs)
    (captured,) = StandInCapture.captured
    # Call 1 eager (compiles), call 2 captured then replayed, calls 3 and 4 replayed.
    assert captured.replays == 3 and hook.replays == 3
    with torch.no_grad():
        model(torch.ones(4, 3))
        model(torch.ones(4, 3))
    assert len(StandInCapture.captured) == 2, "another shape is another graph"


def test_other_values_make_other_keys_and_unhashable_ones_run_eagerly(model: Doubler) -> None:
    x = torch.ones(2)
    key = graphs.call_key((x,), {"scale": 1.0})
    assert key == graphs.call_key((torch.zeros(2),), {"scale": 1.0}), "values of tensors are not in the key"
    assert key != graphs.call_key((x,), {"scale": 2.0})
    assert key != graphs.call_key((x.double(),), {"scale": 1.0})
    assert key != graphs.call_key((x,), {"scale": 1.0, "extra": None})
    assert graphs.call_key((x,), {"extra": object()}) is None
    with torch.no_grad():
        for _ in range(3):
            model(x, extra=object())
    assert StandInCapture.captured == []


def test_calls_with_gradients_never_capture(model: Doubler) -> None:
    with torch.enable_grad():  # a model loaded earlier in this process turned gradients off globally
        for _ in range(3):
            model(torch.ones(2))
    assert StandInCapture.captured == []


def test_graphs_kept_are_bounded_least_recently_used_first(
    model: Doubler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    hook = model._diffusers_hook.get_hook(graphs.HOOK_NAME)
    with torch.no_grad():
        for size in (1, 2, 1, 3):
            model(torch.ones(size))
            model(torch.ones(size))
    assert len(hook.graphs) == 2
    kept_sizes = {key[1][0][0] for key in hook.graphs}
    assert kept_sizes == {1, 3}


def test_a_failed_capture_turns_graphs_off_and_the_call_still_answers(model: Doubler) -> None:
    StandInCapture.fail = True
    hook = model._diffusers_hook.get_hook(graphs.HOOK_NAME)
    x = torch.ones(3)
    with torch.no_grad():
        results = [model(x)[0] for _ in range(3)]
    assert all(torch.equal(r, x * 2) for r in results)
    assert hook.disabled and "capturing" in hook.disabled
    assert model.calls == 3


def test_release_drops_every_graph(model: Doubler) -> None:
    hook = model._diffusers_hook.get_hook(graphs.HOOK_NAME)
    with torch.no_grad():
        model(torch.ones(2))
        model(torch.ones(2))
    assert hook.graphs
    hook.release()
    assert not hook.graphs and not hook.seen


@pytest.mark.parametrize(
    ("setting", "device", "tier", "wanted"),
    [
        ("auto", "cuda:0", Tier.L, True),
        ("auto", "cuda:0", Tier.XL, True),
        ("off", "cuda:0", Tier.L, False),
        ("auto", "cpu", Tier.L, False),
        ("auto", "cuda:0", Tier.E, False),
        ("auto", "cuda:0", Tier.M, False),
        ("auto", "cuda:0", Tier.S, False),
    ],
)
def test_which_workers_get_graphs(setting: str, device: str, tier: Tier, wanted: bool) -> None:
    got, why = graphs.graphs_wanted(setting, device=device, recipe=recipe_for(tier))
    assert got is wanted
    assert why.startswith("CUDA graphs: ")
