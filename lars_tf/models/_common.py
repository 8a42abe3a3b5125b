"""Argument handling shared by the model builders: data format, dtype policy, input shape,
and the model input (float images, or uint8 images normalised on the model's device)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import keras

DATA_FORMATS = ("channels_last", "channels_first")


def resolve_data_format(data_format: str | None) -> str:
    """Returns `data_format`, or Keras' global image data format when it is None."""
    if data_format is None:
        return keras.config.image_data_format()
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS} or None, got {data_format!r}")
    return data_format


def check_data_format_runs(data_format: str) -> None:
    """Raises ValueError if a `data_format` model could not run its first step here.

    TensorFlow's own CPU kernels of Conv2D and MaxPool take NHWC only; NCHW runs on a GPU or
    through oneDNN's CPU kernels, which TensorFlow turns on by default only on CPUs with
    AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX (many AMD EPYCs and older Xeons have none).
    Without either, a channels_first model builds and then fails in its first `fit` or
    `predict` ("The Conv2D op currently only supports the NHWC tensor format on the CPU"):
    refusing at build time names the cause and the ways out. Other Keras backends run NCHW
    on any device. Under TensorFlow the first call runs two tiny ops on the CPU, so call it
    after `tf.config.threading` is set.
    """
    if data_format != "channels_first" or keras.backend.backend() != "tensorflow":
        return
    if tensorflow_runs_nchw():
        return
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    state = "unset" if setting is None else repr(setting)
    raise ValueError(
        "data_format='channels_first' cannot run on this machine: no GPU is visible and "
        "TensorFlow's CPU Conv2D and MaxPool kernels take NHWC only without oneDNN "
        f"(TF_ENABLE_ONEDNN_OPTS is {state}; TensorFlow turns oneDNN on by default only on "
        "CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX). Use data_format='channels_last' "
        "(the same weights), or set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow is imported "
        "(oneDNN's CPU kernels take NCHW)."
    )


@functools.cache
def tensorflow_runs_nchw() -> bool:
    """Whether TensorFlow can convolve and pool NCHW tensors here (a GPU, or oneDNN on CPU).

    Probed by running the two ops rather than read from the oneDNN setting: that is the
    capability the models need, whatever decided it.
    """
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return True
    images = tf.zeros((1, 1, 4, 4))
    try:
        with tf.init_scope(), tf.device("/CPU:0"):
            tf.nn.conv2d(images, tf.zeros((1, 1, 1, 1)), 1, "VALID", data_format="NCHW")
            tf.nn.max_pool2d(images, 2, 2, "VALID", data_format="NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def channel_axis(data_format: str) -> int:
    """The axis of a 4-D image batch that holds the channels."""
    return -1 if data_format == "channels_last" else 1


def resolve_policy(dtype: str | keras.DTypePolicy | None) -> keras.DTypePolicy:
    """Returns the dtype policy for `dtype`, or the global policy when it is None.

    The policy is resolved once, at build time, and handed to every layer explicitly, so a
    saved model keeps it whatever the global policy is when the model is loaded.
    """
    if dtype is None:
        return keras.config.dtype_policy()
    try:
        return keras.dtype_policies.get(dtype)
    except ValueError as error:
        raise ValueError(
            "dtype must be a dtype policy name such as 'float32', 'mixed_float16' or "
            f"'mixed_bfloat16', a keras.DTypePolicy, or None; got {dtype!r}"
        ) from error


def resolve_input_shape(
    input_shape: Sequence[int] | None, image_size: int, data_format: str
) -> tuple[int, int, int]:
    """Returns the per-example input shape, RGB at `image_size` by default.

    Args:
        input_shape: `(height, width, channels)` for channels_last or `(channels, height,
            width)` for channels_first, or None for a square RGB image of `image_size`.
        image_size: Side of the default square input.
        data_format: "channels_last" or "channels_first".
    """
    if input_shape is None:
        if data_format == "channels_last":
            return (image_size, image_size, 3)
        return (3, image_size, image_size)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        layout = "(height, width, channels)" if data_format == "channels_last" else "(c, h, w)"
        raise ValueError(
            f"input_shape must be three positive ints {layout} for {data_format}, got {shape!r}"
        )
    return shape


def spatial_size(input_shape: tuple[int, int, int], data_format: str) -> tuple[int, int]:
    """`(height, width)` of a per-example input shape."""
    if data_format == "channels_last":
        return input_shape[0], input_shape[1]
    return input_shape[1], input_shape[2]


def check_num_classes(num_classes: int) -> None:
    """Raises ValueError unless `num_classes` is a positive int."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def check_dropout(dropout: float) -> None:
    """Raises ValueError unless `0 <= dropout < 1`."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def float32_logits(logits: keras.KerasTensor, policy: keras.DTypePolicy) -> keras.KerasTensor:
    """Casts logits to float32 when the model computes in a lower precision.

    A float16 softmax cross-entropy overflows for confident logits; the Keras
    mixed-precision guide ends every model with a float32 layer for this reason.
    """
    if policy.compute_dtype == "float32":
        return logits
    return keras.layers.Activation("linear", dtype="float32", name="logits")(logits)


def make_model(
    inputs: keras.KerasTensor, logits: keras.KerasTensor, policy: keras.DTypePolicy, name: str
) -> keras.Model:
    """Wraps a functional graph in a `keras.Model` whose own dtype policy is `policy`.

    A functional model takes the global policy whatever its layers use; with the model's
    policy set, `compile()` wraps the optimizer in a `LossScaleOptimizer` under
    "mixed_float16", exactly as Keras does when the policy is set globally.
    """
    model = keras.Model(inputs, float32_logits(logits, policy), name=name)
    model.dtype_policy = policy
    return model


def model_input(
    input_shape: tuple[int, int, int],
    data_format: str,
    policy: keras.DTypePolicy,
    normalize_input: tuple[Sequence[float] | None, Sequence[float] | None] | None,
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """`(inputs, x)`: the model's `Input` and the tensor its first layer takes.

    Args:
        input_shape: Per-example input shape in `data_format`.
        data_format: "channels_last" or "channels_first".
        policy: The model's dtype policy.
        normalize_input: None: the input is a float image, normalised by the input pipeline.
            `(mean, std)` (each per-channel values on the 0..255 scale, or None for 0 and 1):
            the input is a uint8 image that the model normalises itself, `(x - mean) / std`
            in its compute dtype (`input_normalization`, a `keras.layers.Normalization`), so
            that this float work runs on the accelerator and the input pipeline ships a
            quarter of the bytes (`lars_tf.data.build_dataset(normalize=False)`).
    """
    if normalize_input is None:
        inputs = keras.Input(shape=input_shape, name="images")
        return inputs, inputs
    mean, std = normalize_input
    channels = input_shape[-1] if data_format == "channels_last" else input_shape[0]

    def per_channel(values: Sequence[float] | None, default: float, what: str) -> list[float]:
        values = [default] if values is None else [float(v) for v in values]
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise ValueError(f"input {what} has {len(values)} values for {channels} channels")
        return values

    mean = per_channel(mean, 0.0, "mean")
    variance = [v * v for v in per_channel(std, 1.0, "std")]
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="images")
    x = keras.layers.Normalization(
        axis=channel_axis(data_format),
        mean=mean,
        variance=variance,
        dtype=policy,
        name="input_normalization",
    )(inputs)
    return inputs, x
