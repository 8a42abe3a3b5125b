"""`lars_tf.trainer.fit` on whichever Keras backend this process runs (see
tests/any_backend/test_lars_any_backend.py for how the suite runs this folder per backend)."""

from __future__ import annotations

import contextlib
import gc

import keras
import numpy as np
import tensorflow as tf

from lars_tf.guard import RunGuard
from lars_tf.trainer import fit


def live_input_iterators() -> int:
    return sum(isinstance(o, tf.data.Iterator) for o in gc.get_objects())


@contextlib.contextmanager
def data_parallel_if_jax():
    """Under JAX with two devices, `keras.distribution.DataParallel`: the path of the jax
    engine, whose epoch iterators Keras keeps in reference cycles."""
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    devices = jax.devices()[:2]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


def test_fit_leaves_no_input_iterator_alive():
    # Under DataParallel each `model.fit` left its tf.data iterators in reference cycles: one
    # per epoch under exact resume, each holding its pipeline (shuffle buffer, threads) until
    # a full collection, and those still there at interpreter exit made two JAX processes
    # wait 20 to 40 s past their last line. `fit` collects after each call. The automatic
    # collection is off here, so that it cannot free them in the test's place.
    x = np.ones((4, 3), "float32")
    y = np.zeros((4, 2), "float32")

    def dataset_for_epoch(epoch: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4, seed=epoch).repeat().batch(2)

    gc.collect()
    before = live_input_iterators()
    with data_parallel_if_jax():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        guard = RunGuard(total_batches=6)
        gc.disable()
        try:
            histories = fit(
                model,
                dataset_for_epoch,
                guard=guard,
                batches_per_epoch=2,
                callbacks=[guard],
                verbose=0,
                exact_resume=True,
            )
            left = live_input_iterators()
        finally:
            gc.enable()
    assert len(histories) == 3  # one `model.fit` per epoch
    assert left == before
