"""ResNet v1 (He et al. 2016): ResNet-50 for ImageNet and the CIFAR ResNet-20/32.

One builder makes both families; the registry's names are option sets of it:

- `resnet50`: bottleneck blocks [3, 4, 6, 3] of widths 64..512 (x4 out), the ImageNet stem
  (7x7/2 conv, 3x3/2 max pool), projection shortcuts where the shape changes ("option B").
  The stride of a downsampling block sits on its first 1x1 conv (v1; "v1.5" moves it to
  the 3x3). Convolutions have no bias; every one is followed by batch norm with scale and
  offset; fc with bias. Exactly 25,557,032 trainable parameters with 1,000 classes.
- `resnet20_cifar`, `resnet32_cifar`: He et al. section 4.2, a 3x3 conv of 16 filters, then
  3 stages of n = 3 or 5 basic blocks of 16, 32 and 64 filters, global pooling and fc.
  Shortcuts are identities, with "option A" (subsample and zero-pad the channels, no
  parameters) where the shape changes, as the paper's CIFAR nets: 269,722 and 464,154
  trainable parameters with 10 classes. `shortcut="B"` gives the projection variant.

Layer names are those of He et al.'s released Caffe ResNets: `conv1`, `bn_conv1`, `pool1`,
`res2a_branch2a`, `bn2a_branch2a`, ..., `res2a_branch1` (the shortcut), `res2a` (the sum),
then `pool5` and `fc{num_classes}` (`fc1000`). Stages count from 2 as in the paper's
`conv2_x`; blocks are lettered a, b, c, ...

Not keras-cv's `ResNetBackbone`: it builds the same v1 graph and parameter count, but is
hard-wired to channels_last (batch-norm axis 3), leaves the convolutions at Keras'
Glorot-uniform default, has no hook for zero-initialized residual scales or the batch-norm
momentum, pads the stride-2 7x7 conv asymmetrically ("same"), and names layers
`v2_stack_0_block1_1_conv` for a v1 net. Plain Keras layers do all of that in a page.

Initialization: convolutions He-normal with fan-out, untruncated, std sqrt(2 / (k * k *
out_channels)) -- He et al. 2015 as fb.resnet.torch, torchvision and Caffe2's MSRAFill (used
by Goyal et al.) apply it; fc Gaussian std 0.01 with zero bias (Goyal et al. 2017, sec.
5.1); batch-norm scale 1 and offset 0, or scale 0 on the last batch norm of every residual
branch with `zero_init_residual` (Goyal et al.), so each block starts as an identity.

Batch norm: epsilon 1e-5 and Keras momentum 0.9 (PyTorch's momentum 0.1, the MLPerf
reference's decay 0.9); Keras' default 0.99 lags too far behind for runs of few steps per
epoch, which is what large batches give. Stride-2 3x3 and 7x7 convs pad symmetrically by
k // 2 (as Caffe and PyTorch do), which keeps them aligned with the subsampling of the
1x1 and option-A shortcuts.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import keras

from lars_tf.models import _common
from lars_tf.models.layers import ZeroPadShortcut

BLOCKS = ("bottleneck", "basic")
STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B")
_BOTTLENECK_EXPANSION = 4


def resnet(
    num_classes: int = 1000,
    *,
    stage_blocks: Sequence[int] = (3, 4, 6, 3),
    stage_filters: Sequence[int] = (64, 128, 256, 512),
    block: str = "bottleneck",
    stem: str = "imagenet",
    shortcut: str = "B",
    zero_init_residual: bool = False,
    dropout: float = 0.0,
    input_shape: Sequence[int] | None = None,
    data_format: str | None = None,
    dtype: str | keras.DTypePolicy | None = None,
    normalize_input: tuple[Sequence[float] | None, Sequence[float] | None] | None = None,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
    name: str = "resnet50",
) -> keras.Model:
    """Builds a ResNet v1 that outputs logits; the defaults give ResNet-50.

    Args:
        num_classes: Width of the final fc layer.
        stage_blocks: Number of residual blocks in each stage.
        stage_filters: Inner width of each stage's blocks (a bottleneck block outputs 4x);
            conv1 has `stage_filters[0]` filters.
        block: "bottleneck" (1x1, 3x3, 1x1) or "basic" (3x3, 3x3).
        stem: "imagenet" (7x7/2 conv and 3x3/2 max pool) or "cifar" (3x3/1 conv).
        shortcut: Where a block changes shape: "B" projects with a 1x1 conv and batch norm,
            "A" subsamples and zero-pads the channels. Other shortcuts are identities.
        zero_init_residual: Start the last batch-norm scale of every residual branch at 0.
        dropout: Dropout rate before the fc layer; 0 (the reference) leaves it out.
        input_shape: Per-example input shape in `data_format`; default 224x224x3.
        data_format: "channels_last" or "channels_first"; None for Keras' global setting.
        dtype: Dtype policy (e.g. "mixed_float16") of every layer and of the model, so that
            `compile()` adds a `LossScaleOptimizer` under "mixed_float16"; None for the
            global policy. Logits are float32 either way.
        normalize_input: None: float images, normalised by the input pipeline; or
            `(mean, std)`: uint8 images, normalised by the model's first layer (see
            `_common.model_input`).
        bn_momentum: Keras batch-norm momentum (decay of the moving statistics).
        bn_epsilon: Batch-norm epsilon.
        name: Model name.

    Returns:
        An uncompiled functional `keras.Model` from images to `(batch, num_classes)` logits.

    Raises:
        ValueError: If an argument is out of range, or `data_format` is "channels_first" where
            TensorFlow has no NCHW kernels (see `_common.check_data_format_runs`).
    """
    _common.check_num_classes(num_classes)
    _common.check_dropout(dropout)
    stage_blocks, stage_filters = tuple(stage_blocks), tuple(stage_filters)
    if not stage_blocks or len(stage_blocks) != len(stage_filters):
        raise ValueError(
            "stage_blocks and stage_filters must be non-empty and of equal length, got "
            f"stage_blocks={stage_blocks!r}, stage_filters={stage_filters!r}"
        )
    for arg, values in (("stage_blocks", stage_blocks), ("stage_filters", stage_filters)):
        if not all(isinstance(v, int) and v > 0 for v in values):
            raise ValueError(f"{arg} must hold positive ints, got {values!r}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    data_format = _common.resolve_data_format(data_format)
    _common.check_data_format_runs(data_format)
    policy = _common.resolve_policy(dtype)
    input_shape = _common.resolve_input_shape(input_shape, 224, data_format)
    channels = _common.channel_axis(data_format)

    def conv(x, filters, kernel_size, strides, layer):
        padding = "same"
        if strides > 1 and kernel_size > 1:
            # Symmetric padding, as Caffe/PyTorch: TF's "same" would pad (k//2 - 1, k//2)
            # for even inputs and shift every window by one pixel.
            x = keras.layers.ZeroPadding2D(
                kernel_size // 2, data_format=data_format, dtype=policy, name=f"{layer}_pad"
            )(x)
            padding = "valid"
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            data_format=data_format,
            kernel_initializer=keras.initializers.VarianceScaling(
                scale=2.0, mode="fan_out", distribution="untruncated_normal"
            ),
            dtype=policy,
            name=layer,
        )(x)

    def batch_norm(x, layer, zero_scale=False):
        return keras.layers.BatchNormalization(
            axis=channels,
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            gamma_initializer="zeros" if zero_scale else "ones",
            dtype=policy,
            name=layer,
        )(x)

    def relu(x, layer):
        return keras.layers.ReLU(dtype=policy, name=layer)(x)

    def residual_block(x, filters, strides, block_id):
        # Caffe names: res2a_branch2a (conv), bn2a_branch2a, res2a_branch1 (shortcut).
        if block == "bottleneck":
            expanded = _BOTTLENECK_EXPANSION * filters
            branch = [(filters, 1, strides), (filters, 3, 1), (expanded, 1, 1)]
        else:
            branch = [(filters, 3, strides), (filters, 3, 1)]
        out_channels = branch[-1][0]
        y = x
        for index, (units, kernel_size, conv_strides) in enumerate(branch):
            suffix = f"{block_id}_branch2{string.ascii_lowercase[index]}"
            y = conv(y, units, kernel_size, conv_strides, f"res{suffix}")
            last = index == len(branch) - 1
            y = batch_norm(y, f"bn{suffix}", zero_scale=last and zero_init_residual)
            if not last:
                y = relu(y, f"res{suffix}_relu")
        if strides == 1 and x.shape[channels] == out_channels:
            identity = x
        elif shortcut == "B":
            identity = conv(x, out_channels, 1, strides, f"res{block_id}_branch1")
            identity = batch_norm(identity, f"bn{block_id}_branch1")
        else:
            identity = ZeroPadShortcut(
                out_channels,
                strides,
                data_format=data_format,
                dtype=policy,
                name=f"res{block_id}_branch1",
            )(x)
        y = keras.layers.Add(dtype=policy, name=f"res{block_id}")([identity, y])
        return relu(y, f"res{block_id}_relu")

    inputs, images = _common.model_input(input_shape, data_format, policy, normalize_input)
    if stem == "imagenet":
        x = conv(images, stage_filters[0], 7, 2, "conv1")
    else:
        x = conv(images, stage_filters[0], 3, 1, "conv1")
    x = relu(batch_norm(x, "bn_conv1"), "conv1_relu")
    if stem == "imagenet":
        # He et al.'s Caffe pool1 (3x3/2, no padding, output size rounded up) is TF's
        # "same" max pool on even sizes such as 112 (torchvision pads one pixel each side).
        x = keras.layers.MaxPooling2D(
            3, 2, padding="same", data_format=data_format, dtype=policy, name="pool1"
        )(x)
    for stage, (blocks, filters) in enumerate(zip(stage_blocks, stage_filters, strict=True)):
        for index in range(blocks):
            strides = 2 if stage > 0 and index == 0 else 1
            x = residual_block(x, filters, strides, f"{stage + 2}{_block_letter(index, blocks)}")
    x = keras.layers.GlobalAveragePooling2D(data_format=data_format, dtype=policy, name="pool5")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, dtype=policy, name="drop5")(x)
    x = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomNormal(mean=0.0, stddev=0.01),
        bias_initializer="zeros",
        dtype=policy,
        name=f"fc{num_classes}",
    )(x)
    return _common.make_model(inputs, x, policy, name)


def _block_letter(index: int, blocks: int) -> str:
    # Caffe's ResNet-101/152 switch to a, b1, b2, ... once letters would run out.
    if blocks <= len(string.ascii_lowercase):
        return string.ascii_lowercase[index]
    return "a" if index == 0 else f"b{index}"
