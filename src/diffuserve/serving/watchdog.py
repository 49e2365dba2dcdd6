"""How long a batch may run before its worker counts as hung: a limit from the batch's work and past speed."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffuserve.messages import StartupPhases
from diffuserve.types import BatchItem, BatchJob, ModelInfo

# Before any batch finished, a worker's warm-up is the only measure of its speed; it includes compilation,
# so it overestimates, which errs on the side of patience.
EMA_WEIGHT = 0.2


def work_of(job: BatchJob) -> float:
    """What a batch costs the device, in pixel-steps: width × height × steps run × images."""
    return float(job.width * job.height * max(1, job.denoising_steps) * job.num_images)


@dataclass
class BatchLimits:
    """`factor` × the expected time of a batch (its work at the measured seconds per pixel-step), but never
    under `min_s`: the limit after which the watchdog replaces the worker holding it."""

    factor: float
    min_s: float
    _seconds_per_work: float | None = field(default=None, init=False)

    def record(self, job: BatchJob, seconds: float) -> None:
        """A batch's device time (ready-made batches and warm-ups alike)."""
        work = work_of(job)
        if work <= 0 or seconds <= 0:
            return
        rate = seconds / work
        old = self._seconds_per_work
        self._seconds_per_work = rate if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * rate

    def record_warmups(self, model: ModelInfo, phases: StartupPhases) -> None:
        """A worker's warm-up batches (native size) are the first measure of its speed; they include
        compilation, so they overestimate, which errs on the side of patience."""
        for size, seconds in phases.warmup_s.items():
            steps = phases.warmup_steps.get(size, model.default_steps)
            items = [BatchItem("warmup", "", None, list(range(size)), "png", None)]
            self.record(BatchJob(-1, model.native_width, model.native_height, steps, 0.0, items), seconds)

    def expected_s(self, job: BatchJob) -> float | None:
        return None if self._seconds_per_work is None else self._seconds_per_work * work_of(job)

    def limit_s(self, job: BatchJob) -> float:
        expected = self.expected_s(job)
        return self.min_s if expected is None else max(self.min_s, self.factor * expected)
