"""Label smoothing against a NumPy cross-entropy written from its definition."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from lars_tf.losses import SparseCategoricalCrossentropyWithSmoothing, classification_loss


def numpy_smoothed_crossentropy(labels, logits, s):
    logits = logits - logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    classes = logits.shape[-1]
    targets = np.full_like(log_p, s / classes)
    targets[np.arange(len(labels)), labels] += 1.0 - s
    return float(np.mean(-(targets * log_p).sum(-1)))


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5])
def test_matches_the_definition(s):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (8, 5)).astype("float32")
    labels = rng.integers(0, 5, 8)
    got = float(classification_loss(s)(labels, logits))
    assert got == pytest.approx(numpy_smoothed_crossentropy(labels, logits, s), rel=1e-5)
    if s:  # the smoothing really moves the loss
        assert abs(got - numpy_smoothed_crossentropy(labels, logits, 0.0)) > 0.01


def test_zero_smoothing_is_keras_sparse_crossentropy_and_config_round_trips():
    assert isinstance(classification_loss(0.0), keras.losses.SparseCategoricalCrossentropy)
    loss = SparseCategoricalCrossentropyWithSmoothing(0.1)
    again = SparseCategoricalCrossentropyWithSmoothing.from_config(loss.get_config())
    assert again.label_smoothing == 0.1
    with pytest.raises(ValueError, match="label_smoothing"):
        SparseCategoricalCrossentropyWithSmoothing(1.0)
