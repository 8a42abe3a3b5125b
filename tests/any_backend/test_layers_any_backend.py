"""`lars_tf.models.layers.ResizeAndCrop` on whichever Keras backend this process runs.

Its reference is TensorFlow's own bilinear resize (`tf.image.resize`, the host pipeline's),
then the window, the flip and the host's rounding to uint8; `tests/test_backends.py` runs this
file under JAX and PyTorch too.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from lars_tf import models
from lars_tf.models.layers import GEOMETRY, ResizeAndCrop

SIZE, CANVAS = 16, 40
# height, width, resize, top, left, flip: down- and upsampled, a window at each corner,
# mirrored or not, one image that is the whole canvas and one the resize maps onto itself.
CASES = [
    (30, 37, 20, 4, 0, 0),
    (30, 37, 20, 0, 4, 1),
    (7, 9, 16, 0, 0, 1),
    (CANVAS, CANVAS, 18, 2, 2, 0),
    (16, 16, 16, 0, 0, 0),
    (25, 13, 24, 8, 8, 1),
]


def canvases(channels: int = 3):
    rng = np.random.default_rng(0)
    canvas = np.zeros((len(CASES), CANVAS, CANVAS, channels), np.uint8)
    expected = []
    for i, (height, width, resize, top, left, flip) in enumerate(CASES):
        image = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        canvas[i, :height, :width] = image
        resized = tf.image.resize(image, [resize, resize], method="bilinear").numpy()
        window = np.floor(resized[top : top + SIZE, left : left + SIZE] + 0.5)
        expected.append(window[:, ::-1] if flip else window)
    return canvas, np.array(CASES, np.int32), np.stack(expected)


def test_resize_and_crop_is_tensorflows_resize_then_the_window_rounded():
    assert len(CASES[0]) == len(GEOMETRY)
    for channels in (3, 1):
        canvas, geometry, expected = canvases(channels)
        got = keras.ops.convert_to_numpy(ResizeAndCrop(SIZE)((canvas, geometry)))
        assert got.shape == (len(CASES), SIZE, SIZE, channels) and got.dtype == np.float32
        # Integers either way: a float rounding apart would show as a whole level.
        np.testing.assert_array_equal(got, expected)


def test_a_model_with_resize_input_takes_canvases_and_saves(tmp_path):
    model = models.build(
        "alexnet_bn_small",
        num_classes=3,
        input_shape=(SIZE, SIZE, 3),
        width_multiplier=0.125,
        groups=1,
        normalize_input=((120.0, 110.0, 100.0), (60.0, 50.0, 40.0)),
        resize_input=CANVAS,
    )
    assert [tuple(i.shape) for i in model.inputs] == [(None, 6), (None, CANVAS, CANVAS, 3)]
    canvas, geometry, expected = canvases()
    inputs = {"images": canvas, "geometry": geometry}
    # The first layers see the host's pixels, normalised.
    first = keras.Model(model.inputs, model.get_layer("input_normalization").output)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(first(inputs)),
        (expected - [120.0, 110.0, 100.0]) / [60.0, 50.0, 40.0],
        rtol=1e-5,
        atol=1e-5,
    )
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(inputs)), keras.ops.convert_to_numpy(model(inputs))
    )
