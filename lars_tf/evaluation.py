"""Exact evaluation over every worker's shard, and the callback that runs it during training.

`evaluate` sums cross-entropy, top-1 and top-5 hits over each worker's shard (shards may
differ in size), adds the sums across workers and divides by the total count, so the numbers
are those of the whole split, on any engine and backend.
"""

from __future__ import annotations

import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf.engines.base import Engine
from lars_tf.guard import RunGuard


@tf.function(reduce_retracing=True)
def _tf_logits(model, images):
    return tf.cast(model(images, training=False), tf.float32)


# One compiled inference function per model, kept across evaluations (a new `jax.jit` would
# compile again at every epoch).
_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _logits_function(model: keras.Model):
    """The model's compiled inference function on this backend (cached per model)."""
    if model not in _LOGITS:
        _LOGITS[model] = _make_logits_function(model)
    return _LOGITS[model]


def _make_logits_function(model: keras.Model):
    if keras.backend.backend() == "tensorflow":
        return lambda images: _tf_logits(model, images)
    if keras.backend.backend() == "jax":
        import jax

        # One XLA computation per input shape, with the current variable values as inputs.
        call = jax.jit(
            lambda trainable, non_trainable, images: model.stateless_call(
                trainable, non_trainable, images, training=False
            )[0]
        )

        def local(value):
            # Under a DataParallel of several processes a variable also spans the others'
            # devices; each process evaluates its own shard, with its own copy.
            return value if value.is_fully_addressable else value.addressable_data(0)

        def logits(images):
            trainable = [local(v.value) for v in model.trainable_variables]
            non_trainable = [local(v.value) for v in model.non_trainable_variables]
            return call(trainable, non_trainable, keras.ops.convert_to_numpy(images))

        return logits
    return lambda images: model(images, training=False)


def _batch_totals(logits: Any, labels: Any) -> np.ndarray:
    """(summed cross-entropy, top-1 hits, top-k hits, count) of one batch, in float64."""
    logits = keras.ops.cast(logits, "float32")
    labels = keras.ops.cast(keras.ops.convert_to_tensor(np.asarray(labels)), "int32")
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    k = min(5, logits.shape[-1])
    top1 = keras.metrics.sparse_top_k_categorical_accuracy(labels, logits, k=1)
    topk = keras.metrics.sparse_top_k_categorical_accuracy(labels, logits, k=k)
    return np.array(
        [
            np.sum(keras.ops.convert_to_numpy(losses), dtype=np.float64),
            np.sum(keras.ops.convert_to_numpy(top1), dtype=np.float64),
            np.sum(keras.ops.convert_to_numpy(topk), dtype=np.float64),
            float(labels.shape[0]),
        ]
    )


def evaluate(
    model: keras.Model,
    dataset: tf.data.Dataset,
    steps: int | None = None,
    engine: Engine | None = None,
) -> dict:
    """Cross-entropy, top-1 and top-5 accuracy over every worker's shard, exactly.

    Each worker sums over its own shard (shards may differ in size), the sums are added
    across workers, then divided by the total count. Batch-norm statistics are averaged
    across workers first, so every worker evaluates the same model.

    Args:
        model: A model returning logits.
        dataset: This worker's finite evaluation dataset of `(images, labels)` batches.
        steps: Batches to evaluate; None for the whole dataset.
        engine: The run's engine (sums across workers); None: one process.

    Returns:
        `{"loss", "top1", "top5", "examples"}` (top5 is top-k with k = min(5, classes)).
    """
    engine = engine or Engine()
    engine.average_model_state(model)
    logits = _logits_function(model)
    totals = np.zeros(4, np.float64)
    for images, labels in dataset.take(-1 if steps is None else steps):
        totals += _batch_totals(logits(images), labels)
    totals = engine.allreduce_sum(totals, name="lars_tf_evaluation")
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
    `lars_tf.progress.EpochLogAverage`).

    Args:
        dataset: This worker's evaluation dataset (finite).
        guard: The run's `RunGuard`: no evaluation when stopping early (NaN, SIGTERM), and
            always one when the run reaches its end.
        every_n_epochs: Interval; 0 evaluates at the end of the run only.
        steps: Batches per evaluation; None for the whole split.
        target_top1: Stop the run (`guard.stop("target")`) at the first evaluation whose
            top-1 reaches it; None: never.
        engine: The run's engine; None: one process.

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
        engine: Engine | None = None,
    ):
        super().__init__()
        self.engine = engine
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
        self.last_results = evaluate(self.model, self.dataset, self.steps, self.engine)
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


def result_line(step: int, results: dict) -> str:
    """An evaluation's results as the line a run's log ends with."""
    return (
        f"Evaluation at step {step} on {results['examples']} images: "
        f"top-1 {100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}%, "
        f"loss {results['loss']:.4f}"
    )
