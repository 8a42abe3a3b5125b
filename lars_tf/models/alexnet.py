"""AlexNet as the LARS paper trained it: BVLC AlexNet (LRN) and the authors' AlexNet-BN.

One builder makes the whole family; the registry's names are option sets of it:

- `alexnet`: BVLC AlexNet, `models/bvlc_alexnet/train_val.prototxt` of BVLC Caffe.
- `alexnet_bn`: the LARS authors' AlexNet-BN, `models/alexnet_bn/train_val2_fp16.prototxt`
  of their nvcaffe branch (the net their 8K and 32K solvers train): the LRNs removed and a
  batch norm without learnable scale or offset before conv2, conv3, conv4 and conv5.
- `alexnet_bn_small`: AlexNet-BN at a quarter width with a 5x5 stride-1 conv1, for 32 to
  64 pixel images on a CPU.

`normalization="batch_norm_all"` is not in the paper: AlexNet-BN plus a batch norm before
fc6, fc7 and fc8. In AlexNet-BN the outputs of conv1..conv4 reach a batch norm (through
ReLU and max pooling, which commute with a positive scale), so the loss does not depend on
the scale of those layers' weights; those of conv5, fc6, fc7 and fc8 do not. With
"batch_norm_all" every layer but fc8 is scale-invariant, as every convolution of a ResNet
is: an ablation of how much of LARS's gain over SGD comes from the layers without one.

Both full-size nets have exactly 60,965,224 trainable parameters with 1,000 classes
(the batch norms of AlexNet-BN have none). Layer names are the prototxt's (`conv1` ...
`fc8`, `norm1`, `bn2` ...), so per-variable logs such as `conv1/kernel` line up with
Table 2 of the paper.

Initialization, from the same prototxts: untruncated Gaussian weights, std 0.01 for the
convolutions and fc8 and 0.005 for fc6 and fc7; constant biases as `_BVLC_BIASES` (for
`normalization="lrn"` or `"none"`) and `_ALEXNET_BN_BIASES` (for `"batch_norm"`).

Differences from Caffe: max pooling rounds output sizes down (Caffe rounds up); at the
native 227x227 input the two agree. Caffe's batch norm averages its statistics with bias
correction; Keras' `momentum` 0.9 is the same decay (`moving_average_fraction: 0.9`)
without it. The prototxts' input scaling (mean subtraction, and x 1/256 for AlexNet-BN) is
the input pipeline's job, not the model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from lars_tf.models import _common
from lars_tf.models.layers import LocalResponseNormalization

NORMALIZATIONS = ("lrn", "batch_norm", "batch_norm_all", "none")

# Bias constants of BVLC's bvlc_alexnet/train_val.prototxt.
_BVLC_BIASES = {
    "conv1": 0.0,
    "conv2": 0.1,
    "conv3": 0.0,
    "conv4": 0.1,
    "conv5": 0.1,
    "fc6": 0.1,
    "fc7": 0.1,
    "fc8": 0.0,
}
# Bias constants of the LARS authors' alexnet_bn/train_val2_fp16.prototxt.
_ALEXNET_BN_BIASES = {
    "conv1": 0.01,
    "conv2": 0.01,
    "conv3": 0.01,
    "conv4": 0.01,
    "conv5": 0.01,
    "fc6": 0.1,
    "fc7": 0.1,
    "fc8": 0.01,
}
# Gaussian weight std of both prototxts; 0.01 for every layer not listed.
_WEIGHT_STDDEVS = {"fc6": 0.005, "fc7": 0.005}

# (filters, kernel size, groups?) of conv1..conv5 and the width of fc6/fc7 at width 1.
_CONV_FILTERS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256}
_GROUPED = ("conv2", "conv4", "conv5")
_FC_UNITS = 4096
_POOL_SIZE, _POOL_STRIDES = 3, 2


def alexnet(
    num_classes: int = 1000,
    *,
    normalization: str = "lrn",
    width_multiplier: float = 1.0,
    groups: int = 2,
    dropout: float = 0.5,
    conv1_kernel_size: int = 11,
    conv1_strides: int = 4,
    conv1_padding: str = "valid",
    input_shape: Sequence[int] | None = None,
    data_format: str | None = None,
    dtype: str | keras.DTypePolicy | None = None,
    normalize_input: tuple[Sequence[float] | None, Sequence[float] | None] | None = None,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-4,
    name: str = "alexnet",
) -> keras.Model:
    """Builds an AlexNet that outputs logits.

    Args:
        num_classes: Width of fc8.
        normalization: "lrn" (BVLC AlexNet: LRN after relu1 and relu2), "batch_norm"
            (AlexNet-BN: batch norm without scale or offset before conv2..conv5),
            "batch_norm_all" (AlexNet-BN plus the same before fc6, fc7 and fc8; not in the
            paper, see the module docstring), or "none".
        width_multiplier: Scales every conv and fc6/fc7 width (rounded to a multiple of 8
            and of `groups`); 1.0 is the paper's net.
        groups: Filter groups of conv2, conv4 and conv5 (2 in AlexNet, from its two GPUs).
        dropout: Dropout rate after fc6 and fc7; 0 leaves the dropout layers out.
        conv1_kernel_size: Side of conv1's kernel (11 in AlexNet).
        conv1_strides: Stride of conv1 (4 in AlexNet).
        conv1_padding: "valid" (AlexNet) or "same".
        input_shape: Per-example input shape in `data_format`; default 227x227x3.
        data_format: "channels_last" or "channels_first"; None for Keras' global setting.
        dtype: Dtype policy (e.g. "mixed_float16") of every layer and of the model, so that
            `compile()` adds a `LossScaleOptimizer` under "mixed_float16"; None for the
            global policy. Logits are float32 either way.
        normalize_input: None: float images, normalised by the input pipeline; or
            `(mean, std)`: uint8 images, normalised by the model's first layer (see
            `_common.model_input`).
        bn_momentum: Keras batch-norm momentum (the authors' moving_average_fraction 0.9).
        bn_epsilon: Batch-norm epsilon (the authors' 1e-4).
        name: Model name.

    Returns:
        An uncompiled functional `keras.Model` from images to `(batch, num_classes)` logits.

    Raises:
        ValueError: If an argument is out of range, the input is too small for the net, or
            `data_format` is "channels_first" where TensorFlow has no NCHW kernels (see
            `_common.check_data_format_runs`).
    """
    _common.check_num_classes(num_classes)
    _common.check_dropout(dropout)
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if conv1_padding not in ("valid", "same"):
        raise ValueError(f"conv1_padding must be 'valid' or 'same', got {conv1_padding!r}")
    data_format = _common.resolve_data_format(data_format)
    _common.check_data_format_runs(data_format)
    policy = _common.resolve_policy(dtype)
    input_shape = _common.resolve_input_shape(input_shape, 227, data_format)
    _check_input_size(input_shape, data_format, conv1_kernel_size, conv1_strides, conv1_padding)

    divisor = math.lcm(8, groups)

    def width(units: int) -> int:
        if width_multiplier == 1.0:
            return units
        return max(divisor, round(units * width_multiplier / divisor) * divisor)

    filters = {layer: width(units) for layer, units in _CONV_FILTERS.items()}
    for layer in _GROUPED:
        # A grouped conv needs both its input and output channels divisible by groups.
        previous = f"conv{int(layer[-1]) - 1}"
        if filters[layer] % groups or filters[previous] % groups:
            raise ValueError(
                f"groups={groups} must divide the channels of {previous} "
                f"({filters[previous]}) and {layer} ({filters[layer]})"
            )
    batch_normed = normalization in ("batch_norm", "batch_norm_all")
    biases = _ALEXNET_BN_BIASES if batch_normed else _BVLC_BIASES
    channels = _common.channel_axis(data_format)

    def conv(x, layer, kernel_size, strides=1, padding="same"):
        return keras.layers.Conv2D(
            filters[layer],
            kernel_size,
            strides=strides,
            padding=padding,
            groups=groups if layer in _GROUPED else 1,
            data_format=data_format,
            kernel_initializer=_gaussian(layer),
            bias_initializer=keras.initializers.Constant(biases[layer]),
            dtype=policy,
            name=layer,
        )(x)

    def dense(x, layer, units):
        return keras.layers.Dense(
            units,
            kernel_initializer=_gaussian(layer),
            bias_initializer=keras.initializers.Constant(biases[layer]),
            dtype=policy,
            name=layer,
        )(x)

    def relu(x, index):
        return keras.layers.ReLU(dtype=policy, name=f"relu{index}")(x)

    def pool(x, index):
        return keras.layers.MaxPooling2D(
            _POOL_SIZE, _POOL_STRIDES, data_format=data_format, dtype=policy, name=f"pool{index}"
        )(x)

    def lrn(x, index):
        if normalization != "lrn":
            return x
        return LocalResponseNormalization(
            size=5,
            alpha=1e-4,
            beta=0.75,
            k=1.0,
            data_format=data_format,
            dtype=policy,
            name=f"norm{index}",
        )(x)

    def batch_norm(x, index):
        if not batch_normed or (index > 5 and normalization != "batch_norm_all"):
            return x
        # No learnable scale or offset: the authors' `scale_bias: false`. bn6..bn8 see
        # flattened features, so their axis is the last whatever the data format.
        return keras.layers.BatchNormalization(
            axis=channels if index <= 5 else -1,
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            center=False,
            scale=False,
            dtype=policy,
            name=f"bn{index}",
        )(x)

    def drop(x, index):
        if dropout == 0:
            return x
        return keras.layers.Dropout(dropout, dtype=policy, name=f"drop{index}")(x)

    inputs, images = _common.model_input(input_shape, data_format, policy, normalize_input)
    x = conv(images, "conv1", conv1_kernel_size, conv1_strides, conv1_padding)
    x = pool(lrn(relu(x, 1), 1), 1)
    x = conv(batch_norm(x, 2), "conv2", 5)
    x = pool(lrn(relu(x, 2), 2), 2)
    x = relu(conv(batch_norm(x, 3), "conv3", 3), 3)
    x = relu(conv(batch_norm(x, 4), "conv4", 3), 4)
    x = relu(conv(batch_norm(x, 5), "conv5", 3), 5)
    x = pool(x, 5)
    # Flatten in channels-last order whatever the data format, so fc6 is layout-independent.
    x = keras.layers.Flatten(data_format=data_format, dtype=policy, name="flatten")(x)
    x = drop(relu(dense(batch_norm(x, 6), "fc6", width(_FC_UNITS)), 6), 6)
    x = drop(relu(dense(batch_norm(x, 7), "fc7", width(_FC_UNITS)), 7), 7)
    logits = dense(batch_norm(x, 8), "fc8", num_classes)
    return _common.make_model(inputs, logits, policy, name)


def _gaussian(layer: str) -> keras.initializers.Initializer:
    # Caffe's "gaussian" filler is not truncated.
    return keras.initializers.RandomNormal(mean=0.0, stddev=_WEIGHT_STDDEVS.get(layer, 0.01))


def _check_input_size(
    input_shape: tuple[int, int, int],
    data_format: str,
    kernel_size: int,
    strides: int,
    padding: str,
) -> None:
    """Raises ValueError when pool5 would come out empty, naming the smallest input."""

    def pool5_side(side: int) -> int:
        side = -(-side // strides) if padding == "same" else (side - kernel_size) // strides + 1
        for _ in range(3):  # pool1, pool2, pool5; the convs in between keep the size.
            side = (side - _POOL_SIZE) // _POOL_STRIDES + 1 if side >= _POOL_SIZE else 0
        return side

    for side in _common.spatial_size(input_shape, data_format):
        if pool5_side(side) < 1:
            smallest = next(n for n in range(1, 4096) if pool5_side(n) >= 1)
            raise ValueError(
                f"input_shape {input_shape} is too small for AlexNet with a "
                f"{kernel_size}x{kernel_size}/{strides} {padding} conv1: height and width "
                f"must be at least {smallest}"
            )
