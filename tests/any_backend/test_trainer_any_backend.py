"""`lars_tf.trainer.fit` on whichever Keras backend this process runs (see
tests/any_backend/test_lars_any_backend.py for how the suite runs this folder per backend)."""

from __future__ import annotations

import contextlib
import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

from lars_tf.guard import RunGuard
from lars_tf.trainer import fit


def live_input_iterators() -> int:
    return sum(isinstance(o, tf.data.Iterator) for o in gc.get_objects())


@contextlib.contextmanager
def data_parallel_if_jax():
    """Under JAX, `keras.distribution.DataParallel` over two devices, as the jax engine sets
    it: with any distribution, Keras' JAX epoch iterators hold their input in a cycle."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    distribution = keras.distribution.DataParallel(
        devices=jax.devices()[:2], auto_shard_dataset=False
    )
    keras.distribution.set_distribution(distribution)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


class CountIterators(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.at_begin = []

    def on_train_begin(self, logs=None):
        self.at_begin.append(live_input_iterators())


def test_fit_leaves_no_input_iterator_alive():
    # Under a distribution `fit` collects each call's iterator (see `fit`): none of the
    # earlier calls' is alive when the next begins, nor any after the last. Without one, at
    # most one call's is garbage at a time. Automatic collection is off, so that it cannot
    # free them in the test's place. (Without the collect, 3 are left under JAX; under torch,
    # whose loader holds no cycle, the test cannot fail.)
    x = np.ones((4, 3), "float32")
    y = np.zeros((4, 2), "float32")

    def dataset_for_epoch(epoch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4, seed=epoch).repeat().batch(2)

    gc.collect()
    before = live_input_iterators()
    counts = CountIterators()
    with data_parallel_if_jax():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        guard = RunGuard(total_batches=6)
        enabled = gc.isenabled()
        gc.disable()
        try:
            histories = fit(
                model,
                dataset_for_epoch,
                guard=guard,
                batches_per_epoch=2,
                callbacks=[guard, counts],
                verbose=0,
                exact_resume=True,
            )
            left = live_input_iterators()
        finally:
            if enabled:
                gc.enable()
    assert len(histories) == 3 and len(counts.at_begin) == 3  # one `model.fit` per epoch
    assert max(counts.at_begin) <= before + 1  # at most the starting call's own
    assert left == before if keras.backend.backend() == "jax" else left <= before + 1
