"""The pieces of a training run that `train.py` wires together, flag-free.

- `Checkpointer`: model + optimizer + data position in a `tf.train.CheckpointManager`; rank 0
  writes and restores, never saves non-finite weights, keeps the last K.
- `RunGuard`: counts batches, ends the run at its length, and stops every worker at the same
  step on a NaN/Inf loss or a SIGTERM; `CheckpointCallback` saves every N steps, at epoch ends
  and when training stops (unless the loss went bad).
- `ThroughputCallback`, `EvaluationCallback`, `evaluate`: images/s and exact top-1/top-5
  over each worker's shard of the validation split, summed across workers.
- `fit`: `model.fit` from any step of the run, resuming mid-epoch at the right step.

Resuming: a checkpoint records the batches consumed. Rerunning continues at that step with
the restored optimizer (so the step counter, momentum and schedule continue exactly). The data
position is restored to the epoch: the input is rebuilt for the epoch in progress (with the
seed offset by the epoch, so orders differ between epochs) and the rest of that epoch is drawn
from its start, so examples of a partly done epoch may be seen twice and others not at all in
that one epoch. With `fit(..., exact_resume=True)` (train.py's `--deterministic`) every data
epoch is its own input pipeline and the batches already consumed of a partly done epoch are
read again and dropped, so a deterministic run interrupted anywhere and resumed ends with the
weights of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import distributed

CHECKPOINT_SUBDIR = "checkpoints"


def innermost_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer doing the updates, under any `LossScaleOptimizer`."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:500]


def all_finite(variables: Sequence[Any]) -> bool:
    """Whether every float variable holds finite values only."""
    checks = [
        tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))
        for v in variables
        if keras.backend.standardize_dtype(v.dtype).startswith(("float", "bfloat"))
    ]
    return bool(tf.reduce_all(checks)) if checks else True


class Checkpointer:
    """Model, optimizer, random state and training images consumed, as TF checkpoints.

    `tf.train.CheckpointManager` makes a save atomic: the checkpoint files are written first,
    then the small `checkpoint` index is replaced in one rename, so a crash while writing
    leaves the index naming the previous, complete checkpoint. Only the last `max_to_keep`
    are kept. Only the writer (rank 0) touches the directory; after `restore_latest` the
    caller broadcasts the state to the other workers. The state of the model's random layers
    (dropout's seed generators, which Keras leaves out of the model's checkpoint) is saved
    too, so that a resumed single-process run draws the masks an uninterrupted one would.

    Args:
        directory: Where the checkpoints go (created on the first save).
        model: The model (its weights and batch-norm statistics are saved).
        optimizer: The optimizer, built (its slots, step counter and loss scale are saved).
        max_to_keep: Checkpoints kept.
        is_writer: Whether this process saves and restores.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        max_to_keep: int = 5,
        is_writer: bool = True,
    ):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"`max_to_keep` must be an int >= 1. Received: {max_to_keep!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.model = model
        self.is_writer = is_writer
        # Images, not batches: the data position survives a change of the worker count.
        self._images = tf.Variable(0, dtype=tf.int64, trainable=False, name="images_seen")
        state = dict(model=model, optimizer=optimizer, images_seen=self._images)
        weights = {id(v) for v in model.weights}
        random_state = [v for v in model.variables if id(v) not in weights]
        if random_state:
            state["random_state"] = random_state
        self._checkpoint = tf.train.Checkpoint(**state)
        self._manager = None
        if is_writer:
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, self.directory, max_to_keep=max_to_keep
            )

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint (None without one, or on non-writers)."""
        return self._manager.latest_checkpoint if self._manager is not None else None

    def restore_latest(self) -> int:
        """Restore the newest checkpoint, if any, on the writer.

        Returns:
            The training images consumed (all workers together) when it was saved; 0 without a
            checkpoint or on non-writers.

        Raises:
            ValueError: The checkpoint was written by another model or optimizer, or its
                files cannot be read; the message names it and what to do.
        """
        path = self.latest
        if path is None:
            return 0
        # Every saved model and optimizer variable must find its counterpart, of its shape: a
        # checkpoint of another model or optimizer configuration is an error, not a partial
        # restore.
        try:
            self._checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:
            raise ValueError(
                f"checkpoint {path} does not match this model and optimizer: it was written "
                "by another configuration (train.py: another --model or model option, "
                "--optimizer, --normalize_on_device, or an older lars_tf). Resume with the "
                "flags that wrote it (flags.txt beside it), or start in a new model directory. "
                f"TensorFlow says: {_first_line(error)}"
            ) from None
        except Exception as error:  # TF reports damaged files in many forms (IndexError too)
            raise ValueError(
                f"checkpoint {path} cannot be read: its files are damaged or incomplete. To "
                f"resume from an earlier checkpoint, delete {path}.* and its lines in "
                f"{os.path.join(self.directory, 'checkpoint')}; or start in a new model "
                f"directory. TensorFlow says: {type(error).__name__}: {_first_line(error)}"
            ) from None
        return int(self._images.numpy())

    def save(self, images_seen: int, step: int) -> str | None:
        """Save (writer only), unless the weights are not finite.

        Args:
            images_seen: Training images consumed so far, all workers together.
            step: The optimizer step, which numbers the checkpoint.

        Returns:
            The path written, or None when nothing was written.

        Raises:
            FloatingPointError: The model holds NaN or Inf; the previous checkpoint is kept.
        """
        if not self.is_writer:
            return None
        if not all_finite(self.model.weights):
            raise FloatingPointError(
                f"model weights are not finite at step {step}: not checkpointing; the last "
                f"good checkpoint is {self.latest}"
            )
        self._images.assign(images_seen)
        return self._manager.save(checkpoint_number=step)

    def discard_from(self, step: int) -> list[str]:
        """Delete the checkpoints of `step` and later (writer only), e.g. ones whose weights
        turned out to give a NaN/Inf loss; the newest earlier one becomes the latest.

        The `checkpoint` index is rewritten (atomically) before any file is deleted, so a
        crash in between leaves stray files, never an index naming a deleted checkpoint.

        Returns:
            The path prefixes deleted.
        """
        if not self.is_writer:
            return []
        state = tf.train.get_checkpoint_state(self.directory)
        if state is None:
            return []
        paths = list(state.all_model_checkpoint_paths)
        times = list(state.all_model_checkpoint_timestamps) or [0.0] * len(paths)
        dropped = [p for p in paths if int(p.rsplit("-", 1)[1]) >= step]
        if not dropped:
            return []
        kept = [(p, t) for p, t in zip(paths, times, strict=True) if p not in dropped]
        if kept:
            # Relative names, as CheckpointManager writes them (the directory may move).
            names = [os.path.basename(p) for p, _ in kept]
            # CheckpointManager cannot drop a checkpoint; this (TF1-era) function rewrites its
            # index. Its deprecation notice, which points to CheckpointManager, is silenced.
            logger = tf.get_logger()
            level = logger.level
            logger.setLevel("ERROR")
            try:
                tf.compat.v1.train.update_checkpoint_state(
                    self.directory,
                    names[-1],
                    all_model_checkpoint_paths=names,
                    all_model_checkpoint_timestamps=[t for _, t in kept],
                    last_preserved_timestamp=state.last_preserved_timestamp,
                )
            finally:
                logger.setLevel(level)
        else:
            tf.io.gfile.remove(os.path.join(self.directory, "checkpoint"))
        for path in dropped:
            for name in tf.io.gfile.glob(f"{path}.*"):
                tf.io.gfile.remove(name)
        # A new manager reads the rewritten index (the old one still lists the deleted ones).
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self.directory, max_to_keep=self.max_to_keep
        )
        return dropped


class RunGuard(keras.callbacks.Callback):
    """Counts batches, ends the run at its length, stops all workers on NaN/Inf or SIGTERM.

    The stop decision is one scalar all-reduce (maximum) per batch, so every worker stops
    after the same batch: a worker that stopped alone would leave the others waiting in the
    next gradient all-reduce. After `fit` returns, `stop_reason` says why it stopped early
    ("nan", "sigterm", or None), and `failed_step` the step of a NaN/Inf loss.

    Args:
        total_batches: Micro-batches each worker trains for over the whole run.
        start_batches: Micro-batches already consumed (when resuming).
        accumulation_steps: Micro-batches per optimizer step.
    """

    def __init__(self, total_batches: int, start_batches: int = 0, accumulation_steps: int = 1):
        super().__init__()
        self.total_batches = total_batches
        self.batches_seen = start_batches
        self.accumulation_steps = accumulation_steps
        self.stop_reason: str | None = None
        self.failed_step: int | None = None
        self._sigterm = False
        self._previous_handler = None

    def install_signal_handler(self) -> None:
        """Turn SIGTERM into a clean stop (checkpoint, then exit) instead of an abrupt kill."""

        def handler(signum, frame):
            del signum, frame
            self._sigterm = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def restore_signal_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def stop(self, reason: str) -> None:
        """End the run after this batch for `reason` (e.g. "target": an evaluation reached
        the target accuracy); every worker calls it at the same batch."""
        self.stop_reason = reason
        self.model.stop_training = True

    @property
    def step(self) -> int:
        """Optimizer steps completed, from the batches consumed."""
        return self.batches_seen // self.accumulation_steps

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.batches_seen += 1
        loss = (logs or {}).get("loss")
        bad_loss = loss is not None and not math.isfinite(float(loss))
        code = distributed.allreduce_max(2.0 * bad_loss + 1.0 * self._sigterm, "lars_tf_guard")
        at_boundary = self.batches_seen % self.accumulation_steps == 0
        if code >= 2.0:
            self.stop_reason = "nan"
            # Keras' loss is the epoch's running mean: it turns non-finite at the first bad
            # batch, whose update is this step.
            self.failed_step = (self.batches_seen - 1) // self.accumulation_steps
            self.model.stop_training = True
        elif self.batches_seen >= self.total_batches:
            self.model.stop_training = True  # done, SIGTERM or not
        elif code >= 1.0 and at_boundary:
            # Inside an accumulation the step is half done: finish it, so the checkpoint
            # written on the way out is at a whole step.
            self.stop_reason = "sigterm"
            self.model.stop_training = True

    @property
    def finished(self) -> bool:
        return self.batches_seen >= self.total_batches and self.stop_reason is None


class CheckpointCallback(keras.callbacks.Callback):
    """Checkpoint every N optimizer steps, at each epoch end and when training stops.

    Every worker runs it (the batch-norm statistics are averaged across workers first, a
    collective), the writer saves. Nothing is saved once `guard` saw a NaN/Inf loss, and the
    checkpoint of that step is deleted: its weights are the ones that gave the bad loss, so
    resuming from it would fail at once. Weights found non-finite at a save stop the run the
    same way (`guard.stop_reason == "nan"`). So the last good checkpoint is the latest.
    Saves happen on optimizer-step boundaries only (never inside a gradient accumulation).

    Args:
        checkpointer: Where to save.
        guard: The run's `RunGuard` (batch count and stop reason).
        images_per_batch: Images of one micro-batch over all workers.
        every_n_steps: Interval in optimizer steps; 0 saves at epoch ends and at the end only.
    """

    def __init__(
        self,
        checkpointer: Checkpointer,
        guard: RunGuard,
        images_per_batch: int,
        every_n_steps: int = 0,
    ):
        super().__init__()
        self.checkpointer = checkpointer
        self.guard = guard
        self.images_per_batch = images_per_batch
        self.every_n_steps = every_n_steps
        self._saved_at = guard.batches_seen
        self._nan_handled = False

    def _save(self) -> None:
        guard = self.guard
        if guard.stop_reason == "nan" or guard.batches_seen == self._saved_at:
            return
        if guard.batches_seen % guard.accumulation_steps:
            return  # mid-accumulation: the next boundary will save
        distributed.average_model_state(self.model)
        # Every worker checks (the replicas are identical, so they all decide alike): an
        # update can make the weights non-finite while the loss that produced it was finite.
        if not all_finite(self.model.weights):
            guard.stop_reason = "nan"
            guard.failed_step = guard.step - 1
            self._nan_handled = True  # nothing saved; the checkpoints so far are good
            self.model.stop_training = True
            return
        self.checkpointer.save(guard.batches_seen * self.images_per_batch, guard.step)
        self._saved_at = guard.batches_seen

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.guard.stop_reason == "nan" and not self._nan_handled:
            # The loss of step `failed_step` was computed with the weights saved as that
            # step's checkpoint (the guard runs first, so the loss is the newest news).
            self.checkpointer.discard_from(self.guard.failed_step)
            self._nan_handled = True
        step = self.guard.step
        at_boundary = self.guard.batches_seen % self.guard.accumulation_steps == 0
        if self.every_n_steps and at_boundary and step % self.every_n_steps == 0:
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._save()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._save()


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


@tf.function(reduce_retracing=True)
def _evaluate_batch(model, images, labels):
    logits = tf.cast(model(images, training=False), tf.float32)
    labels = tf.cast(labels, tf.int32)
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    k = min(5, logits.shape[-1])
    top1 = keras.metrics.sparse_top_k_categorical_accuracy(labels, logits, k=1)
    topk = keras.metrics.sparse_top_k_categorical_accuracy(labels, logits, k=k)
    return tf.stack(
        [
            tf.reduce_sum(tf.cast(losses, tf.float64)),
            tf.reduce_sum(tf.cast(top1, tf.float64)),
            tf.reduce_sum(tf.cast(topk, tf.float64)),
            tf.cast(tf.shape(labels)[0], tf.float64),
        ]
    )


def evaluate(model: keras.Model, dataset: tf.data.Dataset, steps: int | None = None) -> dict:
    """Cross-entropy, top-1 and top-5 accuracy over every worker's shard, exactly.

    Each worker sums over its own shard (shards may differ in size), the sums are added
    across workers, then divided by the total count. Batch-norm statistics are averaged
    across workers first, so every worker evaluates the same model.

    Args:
        model: A model returning logits.
        dataset: This worker's finite evaluation dataset of `(images, labels)` batches.
        steps: Batches to evaluate; None for the whole dataset.

    Returns:
        `{"loss", "top1", "top5", "examples"}` (top5 is top-k with k = min(5, classes)).
    """
    distributed.average_model_state(model)
    totals = np.zeros(4, np.float64)
    for images, labels in dataset.take(-1 if steps is None else steps):
        totals += _evaluate_batch(model, images, labels).numpy()
    totals = distributed.allreduce_sum(totals, name="lars_tf_evaluation")
    count = max(totals[3], 1.0)
    return {
        "loss": totals[0] / count,
        "top1": totals[1] / count,
        "top5": totals[2] / count,
        "examples": int(totals[3]),
    }


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluate every N epochs and at the end of the run; adds `val_loss`, `val_top1`,
    `val_top5` to the epoch logs (already summed over workers: put it after
    `distributed.MetricAverageCallback`).

    Args:
        dataset: This worker's evaluation dataset (finite).
        guard: The run's `RunGuard`: no evaluation when stopping early (NaN, SIGTERM), and
            always one when the run reaches its end.
        every_n_epochs: Interval; 0 evaluates at the end of the run only.
        steps: Batches per evaluation; None for the whole split.
        target_top1: Stop the run (`guard.stop("target")`) at the first evaluation whose
            top-1 reaches it; None: never.

    Attributes:
        last_results: The results of the last evaluation, or None.
        last_step: The optimizer step of the last evaluation, or None.
        target_reached: `{"epoch", "update", "top1"}` of the first evaluation at or above
            `target_top1`, or None.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        guard: RunGuard,
        every_n_epochs: int = 1,
        steps: int | None = None,
        target_top1: float | None = None,
    ):
        super().__init__()
        self.dataset = dataset
        self.guard = guard
        self.every_n_epochs = every_n_epochs
        self.steps = steps
        self.target_top1 = target_top1
        self.last_results: dict | None = None
        self.last_step: int | None = None
        self.target_reached: dict | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.guard.stop_reason is not None:
            return
        due = self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0
        if not (due or self.guard.finished):
            return
        self.last_results = evaluate(self.model, self.dataset, self.steps)
        self.last_step = self.guard.step
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in self.last_results.items() if k != "examples"})
        if self.target_top1 is not None and self.last_results["top1"] >= self.target_top1:
            # The results are summed over the workers, so every worker stops at this epoch.
            self.target_reached = {
                "epoch": epoch + 1,
                "update": self.guard.step,
                "top1": self.last_results["top1"],
            }
            self.guard.stop("target")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One `model.fit` call: Keras epochs `[initial_epoch, epochs)` of `steps_per_epoch`."""

    initial_epoch: int
    epochs: int
    steps_per_epoch: int
    data_epoch: int


def plan_segments(
    start_batches: int, total_batches: int, batches_per_epoch: int, one_per_epoch: bool = False
) -> list[Segment]:
    """Split the rest of a run into `fit` calls whose epochs line up with data epochs.

    A run resumed mid-epoch first finishes that epoch (a shorter Keras epoch of the same
    number), then runs whole epochs; the last epoch may be cut short by `RunGuard`.

    Args:
        start_batches: Micro-batches already consumed per worker.
        total_batches: Micro-batches of the whole run per worker.
        batches_per_epoch: Micro-batches per epoch per worker.
        one_per_epoch: One segment per data epoch instead of one for all the whole epochs.

    Returns:
        The segments to run, possibly none.
    """
    if start_batches >= total_batches:
        return []
    epoch, offset = divmod(start_batches, batches_per_epoch)
    last_epoch = math.ceil(total_batches / batches_per_epoch)
    segments = []
    if offset:
        segments.append(Segment(epoch, epoch + 1, batches_per_epoch - offset, epoch))
        epoch += 1
    if one_per_epoch:
        segments += [Segment(e, e + 1, batches_per_epoch, e) for e in range(epoch, last_epoch)]
    elif epoch < last_epoch:
        segments.append(Segment(epoch, last_epoch, batches_per_epoch, epoch))
    return segments


def fit(
    model: keras.Model,
    dataset_for_epoch: Callable[[int], tf.data.Dataset],
    *,
    guard: RunGuard,
    batches_per_epoch: int,
    callbacks: Sequence[keras.callbacks.Callback],
    verbose: int | str = "auto",
    exact_resume: bool = False,
) -> list[keras.callbacks.History]:
    """Train from `guard.batches_seen` to `guard.total_batches` with `model.fit`.

    Args:
        model: The compiled model.
        dataset_for_epoch: Builds this worker's endless training dataset starting at the given
            data epoch (called once per `fit` call; use the epoch to vary the shuffle seed).
        guard: The run's `RunGuard`; it must also be in `callbacks`, before the checkpoint
            callback.
        batches_per_epoch: Micro-batches per epoch per worker.
        callbacks: Callbacks for every `fit` call.
        verbose: Keras' `verbose` (0 on workers other than rank 0).
        exact_resume: Make the batches of each step independent of interruptions: one `fit`
            call per data epoch, each on `dataset_for_epoch(epoch)` (an uninterrupted run
            also starts every epoch from a fresh pipeline, as a resumed one must), and a
            partly done epoch skips the batches it consumed before the interruption (they
            are read and decoded again, once, on resume). With a deterministic pipeline and
            deterministic ops, a resumed run then ends with the weights of an uninterrupted
            one.

    Returns:
        The `History` of each `fit` call, in order.
    """
    histories = []
    segments = plan_segments(
        guard.batches_seen, guard.total_batches, batches_per_epoch, one_per_epoch=exact_resume
    )
    for segment in segments:
        dataset = dataset_for_epoch(segment.data_epoch)
        consumed = batches_per_epoch - segment.steps_per_epoch
        if exact_resume and consumed:
            dataset = dataset.skip(consumed)
        history = model.fit(
            dataset,
            initial_epoch=segment.initial_epoch,
            epochs=segment.epochs,
            steps_per_epoch=segment.steps_per_epoch,
            callbacks=list(callbacks),
            verbose=verbose,
            shuffle=False,  # the input pipeline shuffles
        )
        histories.append(history)
        if guard.stop_reason is not None:
            break
    return histories
