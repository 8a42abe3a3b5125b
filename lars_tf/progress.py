"""One line of progress every N optimizer updates, for runs whose output is a log file.

Under `horovodrun`, a batch scheduler or `nohup`, stdout is not a terminal and Keras prints
one line per epoch: at ImageNet scale and batch 8K that is 156 updates, minutes of silence.
`ProgressLogger` prints, every `every_n_updates` updates (the big_vision / timm habit):

    update 200/14040 (epoch 1.28) loss 6.1234 top1 1.52% 10432 images/s lr 2.91
        elapsed 0:03:12 eta 3:41:05            (on one line)

`loss` and `top1` are Keras' running means over the epoch so far, on the worker that prints
(rank 0's shard; averaging them would add a collective to every step); `images/s` counts the
images of every worker since the previous line; `eta` extrapolates the time per update of
this process's run so far over the updates left.

`ThroughputCallback` adds the job's training images/s to the epoch logs, and
`EpochLogAverage` makes the epoch logs those of the whole job.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import keras


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class ProgressLogger(keras.callbacks.Callback):
    """Print a progress line every `every_n_updates` optimizer updates.

    Args:
        total_updates: Optimizer updates of the whole run.
        start_update: Updates done before this process started (a resumed run).
        updates_per_epoch: Updates per epoch of the training split.
        images_per_update: Images of one update over all workers (the global batch).
        every_n_updates: Interval, >= 1.
        accumulation_steps: Micro-batches (Keras batches) per update.
        learning_rate: Returns the current learning rate (e.g. of the innermost optimizer),
            or None to leave it out.
        print_fn: Where the line goes (rank 0's `print` in train.py).
    """

    def __init__(
        self,
        *,
        total_updates: int,
        start_update: int,
        updates_per_epoch: int,
        images_per_update: int,
        every_n_updates: int,
        accumulation_steps: int = 1,
        learning_rate: Callable[[], float] | None = None,
        print_fn: Callable[[str], None] = print,
    ):
        super().__init__()
        if every_n_updates < 1:
            raise ValueError(f"`every_n_updates` must be >= 1. Received: {every_n_updates}")
        self.total_updates = total_updates
        self.updates_per_epoch = updates_per_epoch
        self.images_per_update = images_per_update
        self.every_n_updates = every_n_updates
        self.accumulation_steps = accumulation_steps
        self.learning_rate = learning_rate
        self.print_fn = print_fn
        self._start_update = start_update
        self._micro_batches = start_update * accumulation_steps
        self._started: float | None = None
        self._last: tuple[float, int] | None = None

    @property
    def update(self) -> int:
        return self._micro_batches // self.accumulation_steps

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._started is None:  # the first of the run's `fit` calls
            self._started = time.perf_counter()
            self._last = (self._started, self.update)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._micro_batches += 1
        if self._micro_batches % self.accumulation_steps:
            return
        update = self.update
        if update % self.every_n_updates and update != self.total_updates:
            return
        self.print_fn(self.line(update, logs or {}, time.perf_counter()))

    def line(self, update: int, logs: dict, now: float) -> str:
        """The progress line at `update`, `now` being `time.perf_counter()`."""
        last_time, last_update = self._last
        self._last = (now, update)
        rate = (update - last_update) * self.images_per_update / max(now - last_time, 1e-9)
        elapsed = now - self._started
        done_here = update - self._start_update
        eta = elapsed / done_here * (self.total_updates - update) if done_here else 0.0
        parts = [
            f"update {update}/{self.total_updates}",
            f"(epoch {update / self.updates_per_epoch:.2f})",
        ]
        if "loss" in logs:
            parts.append(f"loss {float(logs['loss']):.4f}")
        if "top1" in logs:
            parts.append(f"top1 {100 * float(logs['top1']):.2f}%")
        parts.append(f"{rate:.0f} images/s")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate():.4g}")
        elif "learning_rate" in logs:  # written by `lars_tf.callbacks.LearningRateLogger`
            parts.append(f"lr {float(logs['learning_rate']):.4g}")
        parts += [f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
        return " ".join(parts)


class ThroughputCallback(keras.callbacks.Callback):
    """Adds `images_per_sec` (whole job, training batches only) to the epoch logs.

    Put it before the callbacks that evaluate or checkpoint at epoch end: it stops its clock
    when its own `on_epoch_end` runs.

    Args:
        images_per_batch: Images of one micro-batch over all workers (per-worker batch x
            workers).
    """

    def __init__(self, images_per_batch: int):
        super().__init__()
        self.images_per_batch = images_per_batch
        self._start = None
        self._batches = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        self._batches = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches += 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and self._start is not None and self._batches:
            elapsed = time.perf_counter() - self._start
            logs["images_per_sec"] = self._batches * self.images_per_batch / max(elapsed, 1e-9)


class EpochLogAverage(keras.callbacks.Callback):
    """Average the epoch logs across workers, so every worker reports the job's numbers.

    Put it before the callbacks that read the epoch logs (progress bar, CSV, TensorBoard,
    evaluation): Keras passes one logs dict to every callback in order. Batch logs are left
    local: averaging them would add a collective to every step.

    Args:
        average_logs: The engine's `average_logs(logs, name)` (`Engine.average_logs`;
            `lars_tf.distributed.MetricAverageCallback` passes Horovod's).
    """

    def __init__(self, average_logs: Callable[..., dict]):
        super().__init__()
        self.average_logs = average_logs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs:
            logs.update(self.average_logs(logs, name="lars_tf_epoch_logs"))
