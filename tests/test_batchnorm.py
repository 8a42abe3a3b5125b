"""Batch-norm re-estimation (`lars_tf.batchnorm`): stale statistics versus re-estimated ones."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from lars_tf import batchnorm  # noqa: E402


def _data(n: int = 512, seed: int = 0):
    """Two Gaussian classes far from the origin: BN's initial statistics (mean 0, var 1)
    are far from the real ones, as they are for images on the 0..255 scale."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    features = rng.normal(size=(n, 8)).astype("float32")
    features[:, 0] += 3.0 * (2 * labels - 1)
    features = 5.0 * features + 100.0
    return features, labels.astype("int32")


def _model(momentum: float) -> keras.Model:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8,))
    x = keras.layers.BatchNormalization(momentum=momentum, name="bn1")(inputs)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.BatchNormalization(momentum=momentum, name="bn2")(x)
    x = keras.layers.Activation("relu")(x)
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _accuracy(model, features, labels) -> float:
    logits = model.predict(features, verbose=0, batch_size=256)
    return float(np.mean(np.argmax(logits, -1) == labels))


def test_recalibration_fixes_stale_statistics_after_few_steps():
    features, labels = _data()
    train = tf.data.Dataset.from_tensor_slices((features, labels)).batch(128).repeat()
    model = _model(momentum=0.99)
    # 8 steps: like a 4K-batch CIFAR run's first epoch; 0.99**8 = 92% initial statistics.
    model.fit(train, steps_per_epoch=8, epochs=1, verbose=0)
    stale = _accuracy(model, features, labels)
    used = batchnorm.recalibrate(model, train, num_batches=4)
    fixed = _accuracy(model, features, labels)
    assert used == 4
    assert stale < 0.7, stale
    assert fixed > 0.95, fixed
    # The statistics are those of the data: bn1 sees the raw features.
    bn1 = model.get_layer("bn1")
    np.testing.assert_allclose(bn1.moving_mean.numpy(), features.mean(0), rtol=0.05, atol=0.5)
    # The momentum is restored.
    assert bn1.momentum == 0.99


def test_recalibrate_averages_batch_moments_exactly():
    features, labels = _data(256)
    model = _model(momentum=0.9)
    batches = tf.data.Dataset.from_tensor_slices(features).batch(64)
    assert batchnorm.recalibrate(model, batches, num_batches=10) == 4  # the dataset ends first
    bn1 = model.get_layer("bn1")
    chunks = features.reshape(4, 64, 8)
    np.testing.assert_allclose(bn1.moving_mean.numpy(), chunks.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), chunks.var(1).mean(0), rtol=1e-4)


def test_frozen_batch_norm_is_left_alone():
    features, _ = _data(128)
    model = _model(momentum=0.9)
    model.get_layer("bn1").trainable = False
    batchnorm.recalibrate(model, tf.data.Dataset.from_tensor_slices(features).batch(64), 2)
    np.testing.assert_array_equal(model.get_layer("bn1").moving_mean.numpy(), np.zeros(8))
    assert np.abs(model.get_layer("bn2").moving_mean.numpy()).max() > 0


def test_callback_reestimates_before_evaluation_at_the_due_epochs():
    features, labels = _data()
    train = tf.data.Dataset.from_tensor_slices((features, labels)).batch(128).repeat()
    model = _model(momentum=0.99)
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(_accuracy(self.model, features, labels))

    callback = batchnorm.BatchNormRecalibration(train, num_batches=4, every_n_epochs=2)
    model.fit(train, steps_per_epoch=4, epochs=2, verbose=0, callbacks=[callback, Probe()])
    assert callback.recalibrations == 1  # epoch 2 only; the end of training needs none more
    assert seen[0] < 0.7 and seen[1] > 0.95, seen


def test_momentum_for_steps():
    assert batchnorm.momentum_for_steps(120) == pytest.approx(0.01 ** (1 / 120))
    assert batchnorm.momentum_for_steps(120) ** 120 == pytest.approx(0.01)
    with pytest.raises(ValueError, match="steps"):
        batchnorm.momentum_for_steps(0)
    with pytest.raises(ValueError, match="remaining_weight"):
        batchnorm.momentum_for_steps(10, remaining_weight=1.0)
    with pytest.raises(ValueError, match="num_batches"):
        batchnorm.recalibrate(_model(0.9), tf.data.Dataset.range(1), num_batches=0)


@pytest.mark.slow
def test_train_py_reestimates_before_evaluation_and_leaves_training_alone(tmp_path):
    """train.py --bn_recalibration_batches: same weights as without, other BN statistics."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    common = [
        "--model=alexnet_bn_small",
        "--width_multiplier=0.125",
        "--groups=1",
        "--image_size=32",
        "--synthetic",
        "--synthetic_examples=64",
        "--num_classes=10",
        "--global_batch_size=16",
        "--train_steps=4",
        "--eval_steps=1",
        "--log_every_steps=0",
        "--checkpoint_every_steps=0",
        "--bn_momentum=0.99",
        "--deterministic",
    ]
    values = {}
    for batches in (0, 2):
        model_dir = tmp_path / f"recalibration{batches}"
        proc = subprocess.run(
            [sys.executable, str(repo / "train.py"), *common,
             f"--bn_recalibration_batches={batches}", f"--model_dir={model_dir}"],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1"),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        reader = tf.train.load_checkpoint(
            tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
        )
        values[batches] = {
            name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
        }
    assert values[0].keys() == values[2].keys()
    differing = {n for n in values[0] if not np.array_equal(values[0][n], values[2][n])}
    # Weights, optimizer slots, step counters and dropout's seed state are equal:
    # re-estimation does not touch training. The moving statistics of the 4 batch norms
    # (bn2..bn5) all differ.
    statistics = {n for n in values[0] if "/moving_mean/" in n or "/moving_variance/" in n}
    assert len(statistics) == 2 * 4
    assert differing == statistics
