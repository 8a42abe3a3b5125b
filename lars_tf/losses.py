"""The classification loss of the recipes: cross-entropy on integer labels, with label smoothing.

Keras' `SparseCategoricalCrossentropy` has no `label_smoothing` option; its
`CategoricalCrossentropy` has, on one-hot labels. `SparseCategoricalCrossentropyWithSmoothing`
one-hot encodes the integer labels and calls Keras' own `categorical_crossentropy(...,
label_smoothing=s)`, so that the input pipelines keep shipping integer labels (one int32 per
image instead of 1,000 floats) and the smoothing is Keras' definition:
`targets = (1 - s) * one_hot + s / classes`.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="lars_tf")
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """Cross-entropy of logits against integer labels smoothed by `label_smoothing`.

    Args:
        label_smoothing: `s` in [0, 1): the weight moved from the true class to all classes
            evenly (MLPerf's ResNet-50 uses 0.1; Szegedy et al. 2016).
        name: The loss's name.
        **kwargs: `keras.losses.Loss`'s keywords (`reduction`, `dtype`).
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "crossentropy", **kwargs):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing}"
            )
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        classes = y_pred.shape[-1]
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        one_hot = ops.one_hot(labels, classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def classification_loss(label_smoothing: float = 0.0) -> keras.losses.Loss:
    """Keras' sparse cross-entropy on logits, or its smoothed form when `label_smoothing > 0`."""
    if label_smoothing:
        return SparseCategoricalCrossentropyWithSmoothing(label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
