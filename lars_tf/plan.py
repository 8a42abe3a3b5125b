"""The lengths of a training run, in optimizer updates, and every conversion to other units.

A run thinks in optimizer updates (the unit of the schedules, checkpoints and logs). Keras
counts micro-batches (one per `train_step`, several per update with gradient accumulation),
checkpoints record images (so that the data position survives a change of the worker count),
and people speak in epochs. `RunPlan` holds every length in updates and is the one place that
converts: nothing else multiplies by the accumulation steps or divides by the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def per_worker_batch_size(global_batch_size: int, num_workers: int, accumulation_steps: int) -> int:
    """Examples per micro-batch on each worker: global / (workers x accumulation steps).

    Raises:
        ValueError: An argument is not an int >= 1, or the global batch does not divide.
    """
    for name, value in (
        ("global_batch_size", global_batch_size),
        ("num_workers", num_workers),
        ("accumulation_steps", accumulation_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={value!r}")
    parts = num_workers * accumulation_steps
    if global_batch_size % parts:
        nearest = parts * max(1, round(global_batch_size / parts))
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by workers x accumulation "
            f"steps = {num_workers} x {accumulation_steps} = {parts}; e.g. {nearest}"
        )
    return global_batch_size // parts


def run_length(
    updates_per_epoch: int, epochs: float | None = None, train_updates: int | None = None
) -> int:
    """Updates of a run: `train_updates`, else `epochs` rounded up to whole updates."""
    if train_updates is not None:
        return train_updates
    if epochs is None:
        raise ValueError("give the run's length: `epochs` or `train_updates`")
    return max(1, math.ceil(epochs * updates_per_epoch))


def warmup_length(updates_per_epoch: int, warmup_epochs: float) -> int:
    """Updates of a warm-up of `warmup_epochs` epochs, rounded to whole updates."""
    return int(round(warmup_epochs * updates_per_epoch))


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Every length of a run in optimizer updates; made by `make_plan`.

    Attributes:
        workers: Data-parallel workers (processes, or replicas of a strategy).
        global_batch_size: Examples per update over all workers and micro-batches.
        accumulation_steps: Micro-batches per update on each worker.
        train_examples: Examples in one epoch of the training split.
        updates_per_epoch: Updates per epoch (the last partial batch is dropped).
        total_updates: Updates of the whole run.
        warmup_updates: Updates of the learning-rate warm-up.
        checkpoint_every_updates: Checkpoint interval (0: at epoch ends and the end only).
        progress_every_updates: Interval of the progress lines (0: none).
    """

    workers: int
    global_batch_size: int
    accumulation_steps: int
    train_examples: int
    updates_per_epoch: int
    total_updates: int
    warmup_updates: int
    checkpoint_every_updates: int = 0
    progress_every_updates: int = 0

    @property
    def per_worker_batch_size(self) -> int:
        """Examples per micro-batch on one worker."""
        return self.global_batch_size // (self.workers * self.accumulation_steps)

    @property
    def images_per_micro_batch(self) -> int:
        """Images of one micro-batch over all workers."""
        return self.per_worker_batch_size * self.workers

    def micro_batches(self, updates: int) -> int:
        """Micro-batches (Keras train steps) of one worker in `updates` updates."""
        return updates * self.accumulation_steps

    def images(self, updates: int) -> int:
        """Images of all workers in `updates` updates."""
        return updates * self.global_batch_size

    def epochs(self, updates: int) -> float:
        """`updates` in epochs of the training split."""
        return updates / self.updates_per_epoch

    def updates_from_images(self, images: int) -> int:
        """The updates done when `images` images (of all workers) were consumed, e.g. by a
        checkpoint written with another worker count: the global batch is what a run fixes."""
        return images // self.global_batch_size

    def as_dict(self) -> dict[str, Any]:
        """The fields and the derived per-worker sizes, for `plan.json`."""
        return {
            **dataclasses.asdict(self),
            "per_worker_batch_size": self.per_worker_batch_size,
            "epochs": self.epochs(self.total_updates),
        }


def make_plan(
    *,
    train_examples: int,
    global_batch_size: int,
    workers: int = 1,
    accumulation_steps: int = 1,
    epochs: float | None = None,
    train_updates: int | None = None,
    warmup_epochs: float = 0.0,
    checkpoint_every_updates: int = 0,
    progress_every_updates: int = 0,
) -> RunPlan:
    """The run's plan, with its checks.

    Args:
        train_examples: Examples per epoch of the training split.
        global_batch_size: Examples per update over all workers.
        workers: Data-parallel workers.
        accumulation_steps: Micro-batches per update on each worker.
        epochs: Length in epochs (rounded up to whole updates); or
        train_updates: Length in updates (takes precedence).
        warmup_epochs: Warm-up in epochs (rounded to whole updates).
        checkpoint_every_updates: See `RunPlan`.
        progress_every_updates: See `RunPlan`.

    Raises:
        ValueError: The batch does not divide, the epoch holds no update, the length is
            missing, or the warm-up is not shorter than the run; the message quotes the
            numbers.
    """
    per_worker_batch_size(global_batch_size, workers, accumulation_steps)
    updates_per_epoch = train_examples // global_batch_size
    if updates_per_epoch < 1:
        raise ValueError(
            f"the training split has {train_examples} examples, fewer than one global batch "
            f"of {global_batch_size}"
        )
    total = run_length(updates_per_epoch, epochs, train_updates)
    warmup = warmup_length(updates_per_epoch, warmup_epochs)
    if warmup and warmup >= total:
        raise ValueError(
            f"warmup_epochs={warmup_epochs:g} is {warmup} updates at {updates_per_epoch} "
            f"updates per epoch, not shorter than the {total} updates of the run"
        )
    return RunPlan(
        workers=workers,
        global_batch_size=global_batch_size,
        accumulation_steps=accumulation_steps,
        train_examples=train_examples,
        updates_per_epoch=updates_per_epoch,
        total_updates=total,
        warmup_updates=warmup,
        checkpoint_every_updates=checkpoint_every_updates,
        progress_every_updates=progress_every_updates,
    )
