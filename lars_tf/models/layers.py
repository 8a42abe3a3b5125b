"""The two layers the reference models need that Keras does not ship.

- `LocalResponseNormalization`: Caffe's cross-channel LRN, used by BVLC AlexNet.
- `ZeroPadShortcut`: the parameter-free "option A" shortcut of He et al.'s CIFAR ResNets.

Both are written with `keras.ops` only and registered as serializable, so models that use
them save to and load from `.keras` files without `custom_objects`.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from lars_tf.models._common import resolve_data_format


@keras.saving.register_keras_serializable(package="lars_tf")
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalization across channels, with Caffe's parameters.

    For channel `c` of `n = size` neighbouring channels (zero-padded at the edges):

        out_c = x_c / (k + alpha / n * sum_{c' = c - n//2}^{c + n//2} x_{c'}^2) ** beta

    This is Caffe's `LRN` layer (`norm_region: ACROSS_CHANNELS`), so BVLC's prototxt
    values (`local_size: 5, alpha: 0.0001, beta: 0.75`, `k` 1) are used unchanged.
    Caffe divides `alpha` by the window size and TensorFlow does not: the same layer in
    `tf.nn.local_response_normalization` is `depth_radius=size // 2, bias=k,
    alpha=alpha / size, beta=beta`.

    The sum is computed in float32 whatever the dtype policy: with float16 inputs the
    squares of large activations would overflow.

    Args:
        size: Number of channels in the window (Caffe's `local_size`), odd.
        alpha: Scale of the sum of squares, before Caffe's division by `size`.
        beta: Exponent.
        k: Additive constant (Caffe's `k`, TensorFlow's `bias`).
        data_format: "channels_last" or "channels_first"; None for Keras' global setting.
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, ...).
    """

    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 1.0,
        data_format: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"size must be a positive odd int (as in Caffe), got {size!r}")
        if alpha < 0 or beta < 0 or k <= 0:
            raise ValueError(
                f"LRN expects alpha >= 0, beta >= 0 and k > 0, got alpha={alpha!r}, "
                f"beta={beta!r}, k={k!r}"
            )
        self.size = size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)
        self.data_format = resolve_data_format(data_format)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.data_format == "channels_first":
            x = ops.moveaxis(x, 1, -1)
        channels = x.shape[-1]
        half = self.size // 2
        rank = len(x.shape)
        squares = ops.pad(ops.square(x), [[0, 0]] * (rank - 1) + [[half, half]])
        # A window of `size` neighbours is the sum of `size` shifted views: cheap for
        # size 5, exact, and free of the cancellation a cumulative-sum trick would add.
        window = squares[..., 0:channels]
        for offset in range(1, self.size):
            window = window + squares[..., offset : offset + channels]
        outputs = x * ops.power(self.k + (self.alpha / self.size) * window, -self.beta)
        if self.data_format == "channels_first":
            outputs = ops.moveaxis(outputs, -1, 1)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            size=self.size,
            alpha=self.alpha,
            beta=self.beta,
            k=self.k,
            data_format=self.data_format,
        )
        return config


@keras.saving.register_keras_serializable(package="lars_tf")
class ZeroPadShortcut(keras.layers.Layer):
    """He et al.'s "option A" residual shortcut: subsample, then zero-pad the channels.

    With `strides` s, keeps every s-th row and column starting at the first, which lines up
    with a stride-s convolution padded symmetrically (as the residual branch of this
    package's ResNets is); the new channels are zeros appended after the input's.

    Args:
        filters: Number of output channels, at least the number of input channels.
        strides: Spatial subsampling factor.
        data_format: "channels_last" or "channels_first"; None for Keras' global setting.
        **kwargs: Base `keras.layers.Layer` arguments (`name`, `dtype`, ...).
    """

    def __init__(self, filters: int, strides: int = 1, data_format: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        if not isinstance(strides, int) or strides < 1:
            raise ValueError(f"strides must be a positive int, got {strides!r}")
        self.filters = filters
        self.strides = strides
        self.data_format = resolve_data_format(data_format)

    def _channels(self, shape) -> int:
        return shape[-1] if self.data_format == "channels_last" else shape[1]

    def build(self, input_shape):
        if self._channels(input_shape) > self.filters:
            raise ValueError(
                f"ZeroPadShortcut pads channels up to filters={self.filters} but got "
                f"{self._channels(input_shape)} input channels"
            )

    def call(self, inputs):
        s = self.strides
        if self.data_format == "channels_last":
            x = inputs[:, ::s, ::s, :]
            pad = [[0, 0], [0, 0], [0, 0], [0, self.filters - inputs.shape[-1]]]
        else:
            x = inputs[:, :, ::s, ::s]
            pad = [[0, 0], [0, self.filters - inputs.shape[1]], [0, 0], [0, 0]]
        return ops.pad(x, pad)

    def compute_output_shape(self, input_shape):
        def sub(dim):
            return None if dim is None else math.ceil(dim / self.strides)

        if self.data_format == "channels_last":
            return (input_shape[0], sub(input_shape[1]), sub(input_shape[2]), self.filters)
        return (input_shape[0], self.filters, sub(input_shape[2]), sub(input_shape[3]))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides, data_format=self.data_format)
        return config
