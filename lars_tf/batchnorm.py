"""Batch-norm statistics that match the weights being evaluated, at any batch size.

Batch norm normalises with the current batch's statistics in training and with moving
averages at inference. With momentum `m` the moving average remembers roughly the last
`1 / (1 - m)` steps and still holds a fraction `m ** t` of its initial value (mean 0,
variance 1) after `t` steps. Large-batch training has few steps: CIFAR-10 at batch 4096
has 12 per epoch, so a short run with Keras' default momentum 0.99 evaluates with
statistics that are mostly the initial ones, or that lag far behind weights moving at a
large learning rate, and reports near-chance accuracy for a network that trained well.

Two remedies, both here:

- `momentum_for_steps`: a momentum whose memory is a given number of steps, for models
  built with a `bn_momentum` option (`lars_tf.models`, train.py's `--bn_momentum`).
- `recalibrate` (and `BatchNormRecalibration`, the callback that runs it before the
  evaluations of `fit`): re-estimate every batch norm's statistics from training batches
  with the final weights, as the exact average of the per-batch means and variances
  (PyTorch's `torch.optim.swa_utils.update_bn`, timm's and big_vision's "BN re-estimation"),
  so evaluation no longer depends on the momentum or on the number of steps at all.

Under Horovod each worker re-estimates on its own shard; `lars_tf.evaluation.evaluate`
averages the statistics across workers before evaluating.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import keras_internals


def batch_norm_layers(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """Every `BatchNormalization` layer of `model`, nested ones included, that updates its
    statistics in training (trainable, without batch renormalisation)."""
    return [
        layer
        for layer in keras_internals.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
        and layer.trainable
        and not layer.renorm
    ]


def momentum_for_steps(steps: int, remaining_weight: float = 0.01) -> float:
    """The batch-norm momentum at which the initial statistics weigh `remaining_weight`
    after `steps` updates: `remaining_weight ** (1 / steps)`.

    Example: over 120 steps (10 epochs of CIFAR-10 at batch 4096), `momentum_for_steps(120)`
    is 0.962; Keras' default 0.99 would still be 30% initial statistics there.

    Args:
        steps: Training steps over which the statistics must settle, >= 1.
        remaining_weight: Weight of the initial statistics left after `steps`, in (0, 1).

    Returns:
        The momentum, in [0, 1).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1. Received: steps={steps!r}")
    if not 0.0 < remaining_weight < 1.0:
        raise ValueError(
            f"`remaining_weight` must be in (0, 1). Received: remaining_weight={remaining_weight!r}"
        )
    return float(math.exp(math.log(remaining_weight) / steps))


def recalibrate(
    model: keras.Model,
    dataset: tf.data.Dataset,
    num_batches: int,
    forward: Callable | None = None,
) -> int:
    """Re-estimate the moving statistics of every batch norm of `model` on training batches.

    Runs the model in training mode, statelessly (`make_forward`), on up to `num_batches`
    batches of `dataset` and sets each layer's `moving_mean` and `moving_variance` to the
    average over those batches of the batch mean and batch variance. Layers see the
    statistics of the batch in front of them, as in training. Batch norms that are frozen
    (not trainable) keep theirs; the weights and the state of random layers (dropout's
    seeds) are not touched, so training continues as if nothing had run.

    Args:
        model: The model; its batch-norm layers are found by `batch_norm_layers`.
        dataset: Batches of `(images, labels)` or of images, from the training
            distribution (the training pipeline, augmentation included, is the usual choice).
        num_batches: Batches to average over, >= 1; fewer if the dataset ends before.
        forward: A function made by `make_forward` for this model, to reuse one trace
            across calls (`BatchNormRecalibration` does); None makes a new one.

    Returns:
        The number of batches used (0 when the model has no batch norm).

    Raises:
        ValueError: `num_batches` is not an int >= 1, or the dataset is empty.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(
            f"`num_batches` must be an int >= 1. Received: num_batches={num_batches!r}"
        )
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    forward = forward or make_forward(model, layers)
    momenta = [layer.momentum for layer in layers]
    # Momentum 0: after a pass each moving statistic is exactly the batch's. Traces made
    # now bake the 0 in; the cached function stays right after the momenta are restored.
    for layer in layers:
        layer.momentum = 0.0
    # The pass is stateless (`make_forward`): dropout's seed state is left as it was, so
    # training goes on exactly as it would have without re-estimation.
    sums = None
    used = 0
    try:
        for batch in dataset.take(num_batches):
            images = batch[0] if isinstance(batch, tuple | list) else batch
            if keras.backend.backend() != "tensorflow":
                images = images.numpy()  # tf.data's tensor, for another backend's ops
            if keras.backend.backend() == "jax":
                # Under a distribution of several processes each holds a part of the global
                # batch: the statistics are the global batch's, as in the training step.
                images = keras_internals.distribute_batch(images)
            values = [_local_numpy(v) for v in forward(images)]
            sums = values if sums is None else [s + v for s, v in zip(sums, values, strict=True)]
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    if not used:
        raise ValueError("`dataset` yielded no batch to re-estimate the statistics from")
    for index, layer in enumerate(layers):
        layer.moving_mean.assign(sums[2 * index] / used)
        layer.moving_variance.assign(sums[2 * index + 1] / used)
    return used


def _local_numpy(value: Any) -> np.ndarray:
    """A statistic as float64 NumPy. A JAX array replicated over several processes' devices is
    read from this process's copy (the whole of it cannot be fetched from one process)."""
    if getattr(value, "is_fully_addressable", True) is False:
        if not value.is_fully_replicated:
            raise ValueError(f"a batch-norm statistic sharded over processes: {value.sharding}")
        value = value.addressable_data(0)
    return keras.ops.convert_to_numpy(value).astype(np.float64)


def make_forward(
    model: keras.Model, layers: list[keras.layers.BatchNormalization]
) -> Callable[[Any], list[Any]]:
    """A compiled training-mode forward pass returning each layer's moving statistics after
    it; `recalibrate` calls (and traces) it with every momentum at 0.

    Keras' `stateless_call` returns the updated non-trainable variables instead of assigning
    them, so the same function runs on every backend: compiled with `tf.function` on
    TensorFlow (under a strategy too), `jax.jit` on JAX, eagerly elsewhere."""
    position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    indices = [
        position[id(v)] for layer in layers for v in (layer.moving_mean, layer.moving_variance)
    ]

    def forward(trainable, non_trainable, images):
        _, updated = model.stateless_call(trainable, non_trainable, images, training=True)
        return [updated[i] for i in indices]

    backend = keras.backend.backend()
    if backend == "tensorflow":
        compiled = tf.function(forward, reduce_retracing=True)
    elif backend == "jax":
        import jax  # the JAX backend's own compiler

        compiled = jax.jit(forward)
    else:
        compiled = forward

    def run(images):
        return compiled(
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            images,
        )

    return run


class BatchNormRecalibration(keras.callbacks.Callback):
    """Re-estimates batch-norm statistics (`recalibrate`) at the ends of the epochs that
    are evaluated, so that the evaluation (and the checkpoint written then) uses statistics
    of the current weights.

    Put it before the evaluation callback: Keras runs `on_epoch_end` in list order. Training
    is unaffected (it normalises with batch statistics); the moving statistics simply carry on
    from the re-estimated values.

    Args:
        dataset: Training batches (an endless training pipeline, or any dataset with at
            least `num_batches` batches).
        num_batches: Batches per re-estimation, >= 1.
        every_n_epochs: Re-estimate after epochs whose number (1-based) is a multiple of
            this; 0 only at the end of training.
        guard: Optional `lars_tf.guard.RunGuard`: nothing is done when it stopped the run
            early (NaN, SIGTERM), and the last epoch of a run is always re-estimated. Without
            it, every `every_n_epochs`-th epoch and `on_train_end` are.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        num_batches: int,
        every_n_epochs: int = 1,
        guard: keras.callbacks.Callback | None = None,
    ):
        super().__init__()
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(
                f"`num_batches` must be an int >= 1. Received: num_batches={num_batches!r}"
            )
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, int)
            or every_n_epochs < 0
        ):
            raise ValueError(
                f"`every_n_epochs` must be an int >= 0. Received: every_n_epochs={every_n_epochs!r}"
            )
        self.dataset = dataset
        self.num_batches = num_batches
        self.every_n_epochs = every_n_epochs
        self.guard = guard
        self.recalibrations = 0
        self._forward = None
        self._fresh = False

    def _run(self) -> None:
        layers = batch_norm_layers(self.model)
        if not layers:
            return
        if self._forward is None:
            self._forward = make_forward(self.model, layers)
        recalibrate(self.model, self.dataset, self.num_batches, forward=self._forward)
        self.recalibrations += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None:
            if self.guard.stop_reason is not None:
                return
            last = self.guard.finished
        else:
            last = False
        due = bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0
        self._fresh = due or last
        if self._fresh:
            self._run()

    def on_train_end(self, logs=None):
        # Without a guard the end of training is only known here (after the last epoch's
        # evaluation callbacks ran): re-estimate for whatever evaluates afterwards.
        if self.guard is None and not self._fresh:
            self._run()
            self._fresh = True
