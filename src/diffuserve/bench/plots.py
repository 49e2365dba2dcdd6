"""PNG plots of a sweep: latency percentiles vs users and throughput vs users (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffuserve.bench.summary import StepSummary

LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"


def _figure() -> tuple[Any, Any]:
    import matplotlib

    # Agg: no display needed, and no GUI toolkit picked up from the environment.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    return fig, ax


def _users_axis(ax: Any, users: Sequence[int]) -> None:
    # Sweeps double the user count, so a log2 axis spaces the steps evenly.
    if len(users) > 1 and min(users) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(users))
    ax.set_xticklabels([str(u) for u in users])
    ax.minorticks_off()
    ax.set_xlabel("concurrent users")
    ax.grid(True, alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency(steps: Sequence[StepSummary], path: Path, title: str) -> Path:
    fig, ax = _figure()
    timed = [s for s in steps if s.latency_ms is not None]
    users = [s.users for s in timed]
    for attr, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(users, [getattr(s.latency_ms, attr) for s in timed], style, label=attr)
    _users_axis(ax, [s.users for s in steps])
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend()
    return _save(fig, path)


def plot_throughput(steps: Sequence[StepSummary], path: Path, title: str) -> Path:
    fig, ax = _figure()
    users = [s.users for s in steps]
    ax.plot(users, [s.images_per_s for s in steps], "o-", label="images/s")
    _users_axis(ax, users)
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
