"""Keras 3 callbacks: learning-rate logging, per-layer LARS statistics, and LR driving.

Two kinds of callback live here:

- Loggers. `LearningRateLogger` puts the learning rate into the batch and epoch logs;
  `LayerStatisticsLogger` writes LARS's per-variable local LR, ``||w||`` and ``||g||`` to
  TensorBoard every N steps.
- Drivers. `LearningRateWarmupCallback` and `LearningRateScheduleCallback` set a float
  ``optimizer.learning_rate`` at the start of every batch, for users who drive the rate from
  callbacks, as Horovod's callbacks of the same names did before Keras 3 broke them. They
  evaluate the schedule objects of `lars_tf.schedules`, so the rate of every step equals the
  one the schedule object gives when passed to the optimizer directly.

"Learning rate of step t" always means the global rate that optimizer update ``t`` (counted
from 0, see `lars_tf.schedules`) used. With ``steps_per_execution > 1`` Keras calls batch
callbacks once per execution, so drivers can only change the rate once per execution and loggers
see one batch per execution: prefer schedule objects there.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from lars_tf.schedules import MultiStepWithWarmup

_STATISTICS = ("local_lr", "weight_norm", "grad_norm")


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate`` (a float) to the batch and epoch logs.

    Callbacks later in the list see it, so `keras.callbacks.CSVLogger`, `TensorBoard`
    (``update_freq``), the progress bar and ``History`` record it: put this callback before them.
    The value is the rate the batch's update used (at epoch end: the epoch's last update), for
    optimizers built with a float, a schedule or a callable, wrapped in a
    `keras.optimizers.LossScaleOptimizer` or not.

    Cost: one scalar device read per batch.
    """

    def __init__(self):
        super().__init__()
        self._pending = None
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        self._pending = _rate_of_next_update(self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        rate = self._pending if self._pending is not None else self.model.optimizer.learning_rate
        self._pending = None
        self._last = float(ops.convert_to_numpy(rate))
        if logs is not None:
            logs["learning_rate"] = self._last

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._last is None:
            self._last = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["learning_rate"] = self._last


class LayerStatisticsLogger(keras.callbacks.Callback):
    """Writes LARS's per-variable local LR, ``||w||`` and ``||g||`` to TensorBoard.

    At optimizer steps 0, N, 2N, ... (N = ``every_n_steps``; more exactly, at the first update
    this callback sees, e.g. on resume, then at the first update at or after each multiple of
    N), writes into ``log_dir``, with its own summary writer, at TensorBoard step ``t`` = the
    update's index:

    - scalars ``local_lr/<path>``, ``weight_norm/<path>``, ``grad_norm/<path>`` for each
      trainable variable (``path`` is the Keras variable path, e.g. ``dense/kernel``), the
      values of `LARS.layer_statistics()` for update ``t`` (``||w||`` before the update, the
      gradient after unscaling and all-reduce);
    - one histogram ``local_lr_histogram`` of the local LRs of all variables;
    - the scalar ``learning_rate``, the global rate update ``t`` used.

    A `keras.optimizers.LossScaleOptimizer` is unwrapped through ``inner_optimizer``; updates
    it skips for non-finite gradients are not logged. An optimizer without
    ``layer_statistics()`` (SGD, Adam...) gets the learning rate only, and a warning, once.

    Cost: where ``should_write()`` is false, nothing. Elsewhere one scalar device read per
    batch (the step counter) and, every N steps, one read of all statistics stacked in one
    tensor, then host-side summary writes and a flush.

    Args:
        log_dir: Directory of the event files, created on the first write.
        every_n_steps: N, in optimizer steps.
        should_write: Zero-argument callable, true where this process writes (with Horovod,
            the rank-0 predicate of `lars_tf.distributed`); None means always.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        every_n_steps: int = 100,
        should_write: Callable[[], bool] | None = None,
    ):
        super().__init__()
        if not isinstance(log_dir, str | os.PathLike) or not os.fspath(log_dir):
            raise ValueError(
                f"Argument `log_dir` must be a non-empty path. Received: log_dir={log_dir!r}"
            )
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, numbers.Integral)
            or every_n_steps < 1
        ):
            raise ValueError(
                "Argument `every_n_steps` must be an int >= 1. "
                f"Received: every_n_steps={every_n_steps!r}"
            )
        if should_write is not None and not callable(should_write):
            raise ValueError(
                "Argument `should_write` must be a zero-argument callable or None. "
                f"Received: should_write={should_write!r}"
            )
        self.log_dir = os.fspath(log_dir)
        self.every_n_steps = int(every_n_steps)
        self._should_write = should_write or (lambda: True)
        self._writer = None
        self._warned = False
        # Index of the last update written; -1 so that the first update of a run is due.
        self._last_step = -1
        self._due_step = None
        self._pending_rate = None

    def on_train_begin(self, logs=None):
        optimizer = innermost_optimizer(self.model.optimizer)
        if not hasattr(optimizer, "layer_statistics") and not self._warned:
            self._warned = True
            warnings.warn(
                f"LayerStatisticsLogger: optimizer {type(optimizer).__name__} has no "
                "`layer_statistics()`; logging the learning rate only.",
                stacklevel=2,
            )

    def on_train_batch_begin(self, batch, logs=None):
        self._due_step = None
        if not self._should_write():
            return
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        if step // self.every_n_steps <= self._last_step // self.every_n_steps:
            return
        self._due_step = step
        self._pending_rate = _rate_of_next_update(self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        if self._due_step is None:
            return
        optimizer = self.model.optimizer
        rate = self._pending_rate if self._pending_rate is not None else optimizer.learning_rate
        self._pending_rate = None
        inner = innermost_optimizer(optimizer)
        paths, table = [], None
        if hasattr(inner, "statistics_table") and inner.built:
            paths, table = inner.statistics_table()
        # Two device-to-host copies per log, not one per variable: the step counter (an
        # integer, exact), and the rate and the statistics table concatenated on the device
        # (float32: JAX has no float64 unless x64 is on).
        steps_done = int(ops.convert_to_numpy(optimizer.iterations))
        if steps_done == self._due_step:
            return  # The update was skipped (non-finite gradients): nothing new to log.
        head = ops.reshape(ops.cast(rate, "float32"), (1,))
        if paths:
            head = ops.concatenate([head, ops.reshape(ops.cast(table, "float32"), (-1,))])
        values = ops.convert_to_numpy(head).astype(np.float64)
        step = steps_done - 1  # The last update of this batch (of the execution).
        self._write(step, float(values[0]), paths, values[1:].reshape(len(paths), len(_STATISTICS)))
        self._last_step = step

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, step: int, rate: float, paths: list[str], table: np.ndarray) -> None:
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default(step=step):
            _write_scalar("learning_rate", rate)
            for path, row in zip(paths, table, strict=True):
                for statistic, value in zip(_STATISTICS, row, strict=True):
                    _write_scalar(f"{statistic}/{path}", value)
            if paths:
                tf.summary.write(
                    "local_lr_histogram",
                    _histogram_buckets(table[:, 0]),
                    metadata=_plugin_metadata("histograms"),
                )
        self._writer.flush()


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Sets ``optimizer.learning_rate`` from a schedule at the start of every batch.

    At the start of the batch whose update is step ``t = optimizer.iterations``, if
    ``start_step <= t < end_step``, sets the optimizer's learning-rate variable to
    ``schedule(t)``: the value Keras would use had the schedule been passed to the optimizer.
    Outside that window the rate is left alone, so callbacks compose over consecutive windows
    the way Horovod's did (``start_epoch``/``end_epoch`` there; steps here: multiply epochs by
    the steps per epoch once), and rate-changing callbacks such as ``ReduceLROnPlateau`` can
    act outside it.

    The update is computed on the device (no host read of the step), so it stays exact when a
    `LossScaleOptimizer` skips a step and when training resumes from a checkpoint. With Keras'
    ``gradient_accumulation_steps``, ``t`` counts updates (``optimizer.iterations``): the
    schedule object's equal is then `lars_tf.schedules.PerUpdateSchedule`, since Keras evaluates
    a bare schedule object at its micro-batch counter.

    Works with any Keras 3 optimizer built with a float ``learning_rate`` (Keras keeps it in an
    assignable variable), a `LossScaleOptimizer` around one included. Unlike Horovod's, no
    momentum correction: Keras 3 optimizers compile ``momentum`` into the train step as a
    constant, and schedule objects do not correct either, so the two stay step-for-step equal.

    Example, Goyal's recipe driven by callbacks (``steps`` optimizer steps per epoch):

    ```python
    callbacks = [
        LearningRateWarmupCallback(lr, warmup_epochs=5),
        LearningRateScheduleCallback(
            MultiStepWithWarmup(lr, [30 * steps, 60 * steps, 80 * steps]), start_step=5 * steps
        ),
    ]
    ```

    Args:
        schedule: A `keras.optimizers.schedules.LearningRateSchedule` (e.g.
            `lars_tf.schedules.PolynomialDecayWithWarmup`) or any callable that maps the step,
            a scalar integer tensor, to the rate.
        start_step: First optimizer step the callback sets.
        end_step: Step at which it stops (exclusive); None means never.
    """

    def __init__(self, schedule: Callable, start_step: int = 0, end_step: int | None = None):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                "Argument `schedule` must be a LearningRateSchedule or a callable of the step. "
                f"Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.start_step = _check_step("start_step", start_step)
        if end_step is not None:
            end_step = _check_step("end_step", end_step)
            if end_step <= self.start_step:
                raise ValueError(
                    "Argument `end_step` must be > `start_step`. "
                    f"Received: start_step={start_step}, end_step={end_step}"
                )
        self.end_step = end_step
        self._variable = None

    def on_train_begin(self, logs=None):
        self._variable = _learning_rate_variable(self.model.optimizer, type(self).__name__)

    def on_train_batch_begin(self, batch, logs=None):
        step = self.model.optimizer.iterations
        inside = ops.greater_equal(step, self.start_step)
        if self.end_step is not None:
            inside = ops.logical_and(inside, ops.less(step, self.end_step))
        rate = ops.cast(self.schedule(step), self._variable.dtype)
        self._variable.assign(ops.where(inside, rate, self._variable))


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Warms the learning rate up from ``warmup_start_lr`` to ``initial_learning_rate``.

    For the batch of optimizer step ``t`` with ``t < W`` (``W = warmup_steps``, or
    ``round(warmup_epochs * steps_per_epoch)``), sets::

        lr = r_0 + (gamma_0 - r_0) * (t / W)        # warmup_shape="linear"
        lr = r_0 + (gamma_0 - r_0) * (t / W) ** 2   # warmup_shape="quadratic"

    with ``gamma_0 = initial_learning_rate`` and ``r_0 = warmup_start_lr``; at ``t = W`` (with
    ``steps_per_execution``, the first batch at or after W) it sets ``gamma_0``, then leaves
    the rate to later callbacks. These are the warm-up values of
    `lars_tf.schedules.MultiStepWithWarmup` and `PolynomialDecayWithWarmup`, step for step (it
    evaluates ``MultiStepWithWarmup(initial_learning_rate, [], ...)``).

    From Horovod's ``LearningRateWarmupCallback(initial_lr, warmup_epochs, steps_per_epoch)``:
    ``initial_learning_rate`` is its ``initial_lr`` (the target, already scaled by the number of
    workers) and Horovod's start was ``initial_lr / hvd.size()``, so pass
    ``warmup_start_lr=initial_learning_rate / size`` to match it. Horovod evaluated its ramp
    at ``t + 1`` (reaching the target on the last warm-up step); this callback, like the
    schedules, gives ``r_0`` to the first update and ``gamma_0`` to update ``W``. There is no
    momentum correction (see `LearningRateScheduleCallback`).

    Args:
        initial_learning_rate: ``gamma_0``, the rate at the end of warm-up (required: on resume
            the optimizer's current rate is a mid-warm-up value, not the target).
        warmup_steps: ``W`` in optimizer steps. Give this or ``warmup_epochs``.
        warmup_epochs: Warm-up length in epochs (may be fractional, e.g. 2.5).
        steps_per_epoch: Optimizer steps per epoch (per worker), used with ``warmup_epochs``;
            None reads it from ``fit`` (``params["steps"]``) at the start of training.
        warmup_start_lr: ``r_0``, the rate of step 0.
        warmup_shape: ``"linear"`` or ``"quadratic"``.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        warmup_steps: int | None = None,
        warmup_epochs: float | None = None,
        steps_per_epoch: int | None = None,
        warmup_start_lr: float = 0.0,
        warmup_shape: str = "linear",
    ):
        if (warmup_steps is None) == (warmup_epochs is None):
            raise ValueError(
                "Exactly one of `warmup_steps` and `warmup_epochs` must be given. "
                f"Received: warmup_steps={warmup_steps}, warmup_epochs={warmup_epochs}"
            )
        if warmup_epochs is not None and (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, numbers.Real)
            or not warmup_epochs >= 0
        ):
            raise ValueError(
                "Argument `warmup_epochs` must be a number >= 0. "
                f"Received: warmup_epochs={warmup_epochs!r}"
            )
        if steps_per_epoch is not None:
            _check_step("steps_per_epoch", steps_per_epoch, minimum=1)
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = steps_per_epoch
        self._schedule_arguments = {
            "initial_learning_rate": initial_learning_rate,
            "boundaries": [],
            "warmup_start_lr": warmup_start_lr,
            "warmup_shape": warmup_shape,
        }
        if warmup_steps is None:
            # Validate the other arguments now, even if W waits for `fit`'s steps per epoch.
            warmup_steps = 0 if steps_per_epoch is None else self._epochs_to_steps(steps_per_epoch)
            self._resolved = steps_per_epoch is not None
        else:
            self._resolved = True
        schedule = MultiStepWithWarmup(**self._schedule_arguments, warmup_steps=warmup_steps)
        super().__init__(schedule, start_step=0, end_step=schedule.warmup_steps + 1)

    @property
    def warmup_steps(self) -> int:
        """``W`` in optimizer steps (resolved at the start of training for ``warmup_epochs``)."""
        return self.schedule.warmup_steps

    def on_train_begin(self, logs=None):
        if not self._resolved:
            steps = (self.params or {}).get("steps")
            if not steps:
                raise ValueError(
                    "LearningRateWarmupCallback: `fit` does not know the number of steps per "
                    "epoch (a dataset of unknown length); pass `steps_per_epoch`."
                )
            self.schedule = MultiStepWithWarmup(
                **self._schedule_arguments, warmup_steps=self._epochs_to_steps(steps)
            )
        # Batch callbacks come once per execution of `steps_per_execution` steps: keep the
        # window open until the first of them at or after W, or the ramp never reaches target.
        per_call = getattr(self.model, "steps_per_execution", 1) or 1
        self.end_step = self.schedule.warmup_steps + max(1, int(per_call))
        super().on_train_begin(logs)

    def _epochs_to_steps(self, steps_per_epoch: int) -> int:
        return int(round(self.warmup_epochs * steps_per_epoch))


# TensorFlow 2.21 no longer ships TensorBoard, whose `tf.summary.scalar` and `histogram` raise
# without it; the summaries below are the same records, written with TensorFlow's own
# `tf.summary.write`, so TensorBoard reads them and this module does not depend on it.
def _plugin_metadata(plugin_name: str) -> tf.compat.v1.SummaryMetadata:
    return tf.compat.v1.SummaryMetadata(
        plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name=plugin_name)
    )


def _write_scalar(tag: str, value: float) -> None:
    tf.summary.write(tag, np.float32(value), metadata=_plugin_metadata("scalars"))


def _histogram_buckets(values: np.ndarray, bucket_count: int = 30) -> np.ndarray:
    """TensorBoard's histogram layout: rows ``(left_edge, right_edge, count)``, float64."""
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = values.min(), values.max()
    if low == high:
        # As TensorBoard does: zero-width buckets, all the mass in the last one.
        counts = np.zeros(bucket_count)
        counts[-1] = values.size
        return np.stack([np.full(bucket_count, high), np.full(bucket_count, high), counts], 1)
    counts, edges = np.histogram(values, bins=bucket_count, range=(low, high))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def innermost_optimizer(optimizer):
    """The optimizer that does the updates, under any `LossScaleOptimizer`-style wrappers."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _rate_of_next_update(optimizer):
    """The rate the coming update will use, or None where it is a variable to read afterwards.

    A schedule (or callable) is evaluated now, at the step counter the update will see. A
    variable is read after the batch instead, so that a driver callback anywhere in the list
    has set it by then.
    """
    rate = optimizer.learning_rate
    return None if isinstance(rate, keras.Variable) else rate


def _learning_rate_variable(optimizer, caller: str) -> keras.Variable:
    rate = optimizer.learning_rate
    if not isinstance(rate, keras.Variable):
        raise TypeError(
            f"{caller} sets `optimizer.learning_rate`, which needs an optimizer built with a "
            f"float `learning_rate`; {type(innermost_optimizer(optimizer)).__name__} was built "
            "with a schedule or a callable. Pass the schedule to the optimizer instead, or build "
            "it with a float and drive it from this callback."
        )
    return rate


def _check_step(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"Argument `{name}` must be an int >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)
