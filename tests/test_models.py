"""Tests for lars_tf.models: the registry, the paper's three nets and the small twins.

Parameter counts are the published ones (BVLC AlexNet 60,965,224; ResNet-50 25,557,032;
He et al.'s CIFAR ResNet-20/32 with option-A shortcuts 269,722 / 464,154). Each paper model
is built once per module (a parametrized module-scoped fixture) and every test that changes
its weights restores them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from lars_tf import models
from lars_tf.models import _common
from lars_tf.models.layers import LocalResponseNormalization, ZeroPadShortcut

PAPER_MODELS = {"alexnet": 60_965_224, "alexnet_bn": 60_965_224, "resnet50": 25_557_032}
# Trainable parameters with 10 classes at the default 32x32 input.
SMALL_MODELS = {"alexnet_bn_small": 1_796_458, "resnet20_cifar": 269_722, "resnet32_cifar": 464_154}
# A full-width BVLC AlexNet (LRN, grouped convs) small enough for CPU tests: 67 px is the
# smallest input its 11x11/4 conv1 and three 3x3/2 pools accept.
TINY_ALEXNET = {"num_classes": 10, "input_shape": (67, 67, 3), "width_multiplier": 0.25}

ALEXNET_LAYERS = [
    "images",
    *("conv1", "relu1", "norm1", "pool1"),
    *("conv2", "relu2", "norm2", "pool2"),
    *("conv3", "relu3", "conv4", "relu4", "conv5", "relu5", "pool5", "flatten"),
    *("fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"),
]
# The authors' train_val2_fp16.prototxt: batch norm after pool1, pool2, relu3 and relu4.
ALEXNET_BN_LAYERS = [
    "images",
    *("conv1", "relu1", "pool1"),
    *("bn2", "conv2", "relu2", "pool2"),
    *("bn3", "conv3", "relu3", "bn4", "conv4", "relu4", "bn5", "conv5", "relu5"),
    *("pool5", "flatten", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"),
]


def _labels(batch: int, num_classes: int) -> np.ndarray:
    return np.arange(batch, dtype=np.int32) % num_classes


def _images(model: keras.Model, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *model.input_shape[1:]), dtype=np.float32)


def _trainable_count(model: keras.Model) -> int:
    return sum(math.prod(v.shape) for v in model.trainable_variables)


def _layers_of(model: keras.Model, cls: type) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, cls)]


def _compile(model: keras.Model) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _assert_train_step_learns(model: keras.Model) -> None:
    """One train_on_batch at batch 2: finite loss, every weight and BN statistic moves."""
    _compile(model)
    images = _images(model)
    labels = _labels(2, model.output_shape[-1])
    logits = model.predict(images, verbose=0)
    assert logits.shape == (2, model.output_shape[-1])
    assert np.all(np.isfinite(logits))
    before = [v.numpy().copy() for v in model.variables]
    loss = model.train_on_batch(images, labels)
    assert np.isfinite(loss)
    for variable, old in zip(model.variables, before, strict=True):
        # Every trainable variable gets a gradient; BN moving statistics are updated.
        assert not np.array_equal(variable.numpy(), old), f"{variable.path} did not change"


@pytest.fixture(scope="module", params=list(PAPER_MODELS))
def paper_model(request) -> keras.Model:
    keras.utils.set_random_seed(1)
    return models.build(request.param)


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_the_models_and_their_image_sizes():
    assert models.available() == [
        "alexnet",
        "alexnet_bn",
        "resnet50",
        "alexnet_bn_small",
        "resnet20_cifar",
        "resnet32_cifar",
    ]
    sizes = {name: models.default_image_size(name) for name in models.available()}
    assert sizes == {
        "alexnet": 227,
        "alexnet_bn": 227,
        "resnet50": 224,
        "alexnet_bn_small": 32,
        "resnet20_cifar": 32,
        "resnet32_cifar": 32,
    }


@pytest.mark.parametrize("lookup", [models.build, models.default_image_size])
def test_unknown_name_error_lists_the_registered_ones(lookup):
    with pytest.raises(ValueError, match="vgg16") as error:
        lookup("vgg16")
    for name in models.available():
        assert repr(name) in str(error.value)


def test_unknown_option_is_named_with_the_accepted_ones():
    with pytest.raises(ValueError, match="width_multiplier") as error:
        models.build("resnet20_cifar", num_classes=10, width_multiplier=0.5)
    assert "zero_init_residual" in str(error.value)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("resnet20_cifar", {"num_classes": 0}, "num_classes"),
        ("alexnet_bn_small", {"dropout": 1.0}, "dropout"),
        ("alexnet_bn_small", {"normalization": "group"}, "normalization"),
        ("alexnet_bn_small", {"width_multiplier": 0.0}, "width_multiplier"),
        ("alexnet", {"groups": 3}, "groups=3"),
        ("resnet20_cifar", {"shortcut": "C"}, "shortcut"),
        ("resnet20_cifar", {"block": "wide"}, "block"),
        ("resnet20_cifar", {"stage_blocks": (3, 3)}, "stage_blocks"),
        ("resnet20_cifar", {"data_format": "NHWC"}, "data_format"),
        ("resnet20_cifar", {"dtype": "float8_policy"}, "dtype"),
        ("resnet20_cifar", {"input_shape": (32, 32)}, "input_shape"),
        ("alexnet", {"input_shape": (66, 66, 3)}, "at least 67"),
    ],
)
def test_invalid_options_name_the_argument(name, options, message):
    with pytest.raises(ValueError, match=message):
        models.build(name, **options)


# --- the paper's models ---------------------------------------------------------------------


def test_paper_model_has_the_published_parameter_count(paper_model):
    size = models.default_image_size(paper_model.name)
    assert _trainable_count(paper_model) == PAPER_MODELS[paper_model.name]
    assert paper_model.input_shape == (None, size, size, 3)
    assert paper_model.output_shape == (None, 1000)


def test_paper_model_layer_names_follow_the_reference(paper_model):
    names = [layer.name for layer in paper_model.layers]
    if paper_model.name == "alexnet":
        assert names == ALEXNET_LAYERS
    elif paper_model.name == "alexnet_bn":
        assert names == ALEXNET_BN_LAYERS
        for bn in _layers_of(paper_model, keras.layers.BatchNormalization):
            assert not bn.center and not bn.scale and not bn.trainable_weights
            assert bn.epsilon == pytest.approx(1e-4) and bn.momentum == pytest.approx(0.9)
    else:
        expected = ["conv1", "bn_conv1", "pool1", "res2a_branch1", "bn2a_branch1"]
        expected += ["res2c_branch2c", "res3d", "res4f_branch2b", "res5c_relu", "pool5"]
        assert set(expected + ["fc1000"]) <= set(names)
        assert not {"res2d", "res3e", "res4g", "res5d", "res3a_branch2a_pad"} & set(names)


def test_variable_paths_are_layer_name_slash_weight(paper_model):
    paths = [v.path for v in paper_model.trainable_variables]
    assert len(set(paths)) == len(paths)
    if paper_model.name.startswith("alexnet"):
        layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
        assert paths == [f"{layer}/{weight}" for layer in layers for weight in ("kernel", "bias")]
    else:
        assert paths[:3] == ["conv1/kernel", "bn_conv1/gamma", "bn_conv1/beta"]
        assert {"res2a_branch2a/kernel", "bn5c_branch2c/beta", "fc1000/bias"} <= set(paths)


@pytest.mark.parametrize("paper_model", ["alexnet", "alexnet_bn"], indirect=True)
def test_alexnet_convolutions_are_grouped_as_bvlc(paper_model):
    shapes = {
        layer.name: tuple(layer.kernel.shape)
        for layer in paper_model.layers[1:]
        if isinstance(layer, keras.layers.Conv2D)
    }
    assert shapes == {
        "conv1": (11, 11, 3, 96),
        "conv2": (5, 5, 48, 256),
        "conv3": (3, 3, 256, 384),
        "conv4": (3, 3, 192, 384),
        "conv5": (3, 3, 192, 256),
    }
    assert tuple(paper_model.get_layer("fc6").kernel.shape) == (6 * 6 * 256, 4096)


@pytest.mark.parametrize("paper_model", ["resnet50"], indirect=True)
def test_resnet50_is_v1_with_bias_free_convolutions(paper_model):
    convs = _layers_of(paper_model, keras.layers.Conv2D)
    norms = _layers_of(paper_model, keras.layers.BatchNormalization)
    assert len(convs) == len(norms) == 53
    assert not any(conv.use_bias for conv in convs)
    assert all(bn.center and bn.scale and bn.epsilon == pytest.approx(1e-5) for bn in norms)
    # v1: a downsampling block strides in its first 1x1 conv, not in the 3x3.
    for stage in "345":
        assert paper_model.get_layer(f"res{stage}a_branch2a").strides == (2, 2)
        assert paper_model.get_layer(f"res{stage}a_branch2a").kernel_size == (1, 1)
        assert paper_model.get_layer(f"res{stage}a_branch2b").strides == (1, 1)
        assert paper_model.get_layer(f"res{stage}a_branch1").strides == (2, 2)
    assert paper_model.get_layer("res2a_branch2a").strides == (1, 1)
    assert paper_model.get_layer("res5c").output.shape == (None, 7, 7, 2048)


def test_initialization_follows_the_references(paper_model):
    def std_of(layer):
        return float(np.std(paper_model.get_layer(layer).kernel.numpy()))

    if paper_model.name.startswith("alexnet"):
        if paper_model.name == "alexnet":  # BVLC bvlc_alexnet/train_val.prototxt
            biases = {"conv1": 0, "conv2": 0.1, "conv3": 0, "conv4": 0.1, "conv5": 0.1}
            biases |= {"fc6": 0.1, "fc7": 0.1, "fc8": 0}
        else:  # the authors' alexnet_bn/train_val2_fp16.prototxt
            biases = {f"conv{i}": 0.01 for i in range(1, 6)} | {"fc6": 0.1, "fc7": 0.1}
            biases |= {"fc8": 0.01}
        for layer, value in biases.items():
            np.testing.assert_array_equal(
                paper_model.get_layer(layer).bias.numpy(), np.float32(value), err_msg=layer
            )
            expected = 0.005 if layer in ("fc6", "fc7") else 0.01
            assert std_of(layer) == pytest.approx(expected, rel=0.03), layer
        # Caffe's Gaussian filler is untruncated: conv1's 34,848 draws reach past 3 std.
        assert np.abs(paper_model.get_layer("conv1").kernel.numpy()).max() > 3 * 0.01
    else:
        # He-normal, fan-out, untruncated: std sqrt(2 / (k * k * out_channels)).
        assert std_of("res5a_branch2b") == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.03)
        assert std_of("res2a_branch2c") == pytest.approx(math.sqrt(2 / 256), rel=0.03)
        assert std_of("conv1") == pytest.approx(math.sqrt(2 / (49 * 64)), rel=0.03)
        kernel = paper_model.get_layer("res5a_branch2b").kernel.numpy()
        assert np.abs(kernel).max() > 3 * math.sqrt(2 / (9 * 512))
        assert std_of("fc1000") == pytest.approx(0.01, rel=0.03)
        np.testing.assert_array_equal(paper_model.get_layer("fc1000").bias.numpy(), 0.0)
        for bn in _layers_of(paper_model, keras.layers.BatchNormalization):
            np.testing.assert_array_equal(bn.gamma.numpy(), 1.0)


@pytest.mark.parametrize(
    "paper_model",
    ["alexnet", "alexnet_bn", pytest.param("resnet50", marks=pytest.mark.slow)],
    indirect=True,
)
def test_paper_model_forward_and_train_step(paper_model):
    weights = paper_model.get_weights()
    try:
        _assert_train_step_learns(paper_model)
    finally:
        paper_model.set_weights(weights)


# --- small twins ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    # ResNet-32 is ResNet-20's code with more blocks; tracing its train step takes ~10 s.
    ["alexnet_bn_small", "resnet20_cifar", pytest.param("resnet32_cifar", marks=pytest.mark.slow)],
)
def test_small_model_parameter_count_and_train_step(name):
    keras.utils.set_random_seed(2)
    model = models.build(name, num_classes=10)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 10)
    assert _trainable_count(model) == SMALL_MODELS[name]
    _assert_train_step_learns(model)


def test_alexnet_bn_small_is_the_alexnet_builder_at_quarter_width():
    model = models.build("alexnet_bn_small", num_classes=10, input_shape=(64, 64, 3))
    assert [layer.name for layer in model.layers] == ALEXNET_BN_LAYERS
    assert model.get_layer("conv1").kernel_size == (5, 5)
    assert model.get_layer("conv1").strides == (1, 1)
    assert model.get_layer("conv2").kernel.shape == (5, 5, 12, 64)
    # 64 px -> conv1 64 -> pool1 31 -> pool2 15 -> pool5 7, at 64 channels.
    assert model.get_layer("fc6").kernel.shape == (7 * 7 * 64, 1024)


def test_cifar_resnet_shortcuts():
    option_a = models.build("resnet20_cifar", num_classes=10)
    shortcuts = [layer.name for layer in _layers_of(option_a, ZeroPadShortcut)]
    assert shortcuts == ["res3a_branch1", "res4a_branch1"]
    names = [layer.name for layer in option_a.layers]
    assert names[-3:] == ["res4c_relu", "pool5", "fc10"]
    # Option B projects instead: 1x1 convs 16->32 and 32->64 with their batch norms.
    option_b = models.build("resnet20_cifar", num_classes=10, shortcut="B")
    assert _trainable_count(option_b) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert not _layers_of(option_b, ZeroPadShortcut)


def test_zero_init_residual_zeroes_the_last_scale_of_each_branch():
    basic = models.build("resnet20_cifar", num_classes=10, zero_init_residual=True)
    bottleneck = models.resnet(
        10,
        stage_blocks=(1, 1),
        stage_filters=(8, 16),
        input_shape=(32, 32, 3),
        zero_init_residual=True,
    )
    for model, last in ((basic, "branch2b"), (bottleneck, "branch2c")):
        for bn in _layers_of(model, keras.layers.BatchNormalization):
            expected = 0.0 if bn.name.endswith(last) else 1.0
            np.testing.assert_array_equal(bn.gamma.numpy(), expected, err_msg=bn.name)
    # With every residual branch silent, a block passes relu(shortcut): the whole
    # ResNet-20 after conv1 is the identity on non-negative, unpadded inputs of stage 2.
    stage2 = keras.Model(basic.input, basic.get_layer("res2c_relu").output)
    stem = keras.Model(basic.input, basic.get_layer("conv1_relu").output)
    images = _images(basic)
    np.testing.assert_array_equal(
        stage2(images, training=False).numpy(), stem(images, training=False).numpy()
    )


# Which layers' weights the loss is blind to the scale of: those whose output reaches a batch
# norm through nothing but ReLU and max pooling (both commute with a positive scale).
SCALE_INVARIANT_CASES = {
    "alexnet_bn": ({}, {"conv1", "conv2", "conv3", "conv4"}),
    "alexnet_bn_all": (
        {"normalization": "batch_norm_all"},
        {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"},
    ),
}


@pytest.mark.parametrize("case", [*SCALE_INVARIANT_CASES, "resnet20_cifar"])
def test_batch_norm_makes_exactly_the_expected_layers_scale_invariant(case):
    # The premise of docs/results' reading of ResNet-20 versus the AlexNet twin, checked on
    # the models themselves: scale one layer's kernel and bias by 3 and see whether the
    # training-mode logits move.
    if case == "resnet20_cifar":
        model = models.build(case, num_classes=10, bn_epsilon=1e-12)
        invariant = {layer.name for layer in _layers_of(model, keras.layers.Conv2D)}
    else:
        options, invariant = SCALE_INVARIANT_CASES[case]
        model = models.build(
            "alexnet_bn_small", num_classes=10, dropout=0, bn_epsilon=1e-12, **options
        )
    keras.utils.set_random_seed(3)
    images = _images(model, batch=16)
    reference = model(images, training=True).numpy()
    kernels = [layer for layer in model.layers if hasattr(layer, "kernel")]
    found = set()
    for layer in kernels:
        saved = [v.numpy() for v in layer.trainable_variables]
        for variable in layer.trainable_variables:
            variable.assign(3.0 * variable)
        change = np.abs(model(images, training=True).numpy() - reference).max()
        for variable, value in zip(layer.trainable_variables, saved, strict=True):
            variable.assign(value)
        relative = change / np.abs(reference).max()
        assert relative < 1e-3 or relative > 1e-2, (layer.name, relative)
        if relative < 1e-3:
            found.add(layer.name)
    assert found == invariant
    assert len(found) < len(kernels)  # the classifier never is


def test_alexnet_batch_norm_all_adds_bn6_to_bn8_without_parameters():
    plain = models.build("alexnet_bn_small", num_classes=10)
    everywhere = models.build("alexnet_bn_small", num_classes=10, normalization="batch_norm_all")
    names = [layer.name for layer in everywhere.layers]
    assert names.index("bn6") == names.index("fc6") - 1
    assert names.index("bn7") == names.index("fc7") - 1
    assert names.index("bn8") == names.index("fc8") - 1
    assert _trainable_count(everywhere) == _trainable_count(plain)


def test_bn_momentum_and_epsilon_options_reach_every_batch_norm():
    for name in ("resnet20_cifar", "alexnet_bn_small"):
        model = models.build(name, num_classes=10, bn_momentum=0.97, bn_epsilon=1e-3)
        norms = _layers_of(model, keras.layers.BatchNormalization)
        assert norms and all(bn.momentum == 0.97 and bn.epsilon == 1e-3 for bn in norms)


# --- formats, precision and serialization ---------------------------------------------------

FORMAT_CASES = {
    "alexnet_lrn": ("alexnet", TINY_ALEXNET),
    "alexnet_bn_small": ("alexnet_bn_small", {"num_classes": 10}),
    "resnet20_option_a": ("resnet20_cifar", {"num_classes": 10}),
    "resnet_bottleneck": (
        "resnet50",
        {"num_classes": 10, "input_shape": (32, 32, 3), "stage_blocks": (1, 1, 1, 1)},
    ),
}


CHANNELS_FIRST_REFUSED = "data_format='channels_first' cannot run on this machine"


def _channels_first(name, **options):
    """`models.build(name, data_format="channels_first")`, or None where TF has no NCHW kernels.

    Where neither a GPU nor oneDNN's CPU kernels run NCHW (TF_ENABLE_ONEDNN_OPTS=0, or a CPU
    without AVX512-VNNI and the like), building must be refused with the cause and the fix;
    the caller then has nothing more to compare. test_channels_first_under_each_onednn_setting
    checks both outcomes on every x86 machine.
    """
    if _common.tensorflow_runs_nchw():
        return models.build(name, data_format="channels_first", **options)
    with pytest.raises(ValueError, match=CHANNELS_FIRST_REFUSED) as refused:
        models.build(name, data_format="channels_first", **options)
    assert "TF_ENABLE_ONEDNN_OPTS=1" in str(refused.value)
    assert "data_format='channels_last'" in str(refused.value)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_channels_first_under_each_onednn_setting(onednn):
    # oneDNN is fixed when TensorFlow is imported: one process per setting. Off, TensorFlow's
    # CPU kernels take NHWC only and building is refused; on, the NCHW model computes the
    # NHWC one's logits with plain (non-XLA) kernels. GPUs are hidden: they run NCHW anyway.
    script = Path(__file__).parent / "scripts" / "channels_first.py"
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, CUDA_VISIBLE_DEVICES="")
    process = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    output = process.stdout + process.stderr[-3000:]
    if onednn == "0":
        assert process.returncode == 3, output
        assert CHANNELS_FIRST_REFUSED in output and "TF_ENABLE_ONEDNN_OPTS is '0'" in output
    else:
        assert process.returncode == 0, output
        assert "SAME" in process.stdout


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_channels_first_computes_the_same_function(case):
    name, options = FORMAT_CASES[case]
    last = models.build(name, **options)
    first_options = dict(options)
    if "input_shape" in options:
        height, width, channels = options["input_shape"]
        first_options["input_shape"] = (channels, height, width)
    first = _channels_first(name, **first_options)
    if first is None:
        return
    assert first.input_shape == (None, 3, *last.input_shape[1:3])
    # Same weights in the same order and shapes: fc6 reads a channels-last flatten either way.
    first.set_weights(last.get_weights())
    images = _images(last)
    # XLA compiles the NCHW graph on any device, with its own kernels rather than oneDNN's.
    run_first = tf.function(lambda x: first(x, training=False), jit_compile=True)
    np.testing.assert_allclose(
        run_first(np.transpose(images, (0, 3, 1, 2))).numpy(),
        last(images, training=False).numpy(),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "name, data_format",
    [("alexnet_bn_small", "channels_last"), ("resnet20_cifar", "channels_first")],
)
def test_uint8_input_normalised_by_the_model_equals_float_input(name, data_format):
    # normalize_input moves (x - mean) / std into the model (on its device); with the same
    # weights it computes what the plain model computes on the normalised images.
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    options = dict(num_classes=10, data_format=data_format, input_shape=None)
    if data_format == "channels_first" and _channels_first(name, num_classes=10) is None:
        return
    plain = models.build(name, **options)
    raw = models.build(name, normalize_input=(mean, std), **options)
    assert raw.input.dtype == "uint8"
    assert [v.path for v in raw.trainable_variables] == [v.path for v in plain.trainable_variables]
    raw.set_weights(plain.get_weights())
    shape = plain.input.shape[1:]
    pixels = np.random.default_rng(0).integers(0, 256, (2, *shape)).astype(np.uint8)
    axis = 1 if data_format == "channels_first" else -1
    stats_shape = [1, 1, 1, 1]
    stats_shape[axis] = 3
    normalised = (pixels - np.reshape(mean, stats_shape)) / np.reshape(std, stats_shape)
    np.testing.assert_allclose(
        raw.predict(pixels, verbose=0),
        plain.predict(normalised.astype(np.float32), verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="input mean has 2 values for 3 channels"):
        models.build(name, normalize_input=((1.0, 2.0), None), **options)


def test_channels_first_resnet50_keeps_the_parameter_count():
    model = _channels_first("resnet50")
    if model is None:
        return
    assert model.input_shape == (None, 3, 224, 224)
    assert _trainable_count(model) == PAPER_MODELS["resnet50"]
    assert model.get_layer("res5c").output.shape == (None, 2048, 7, 7)


@pytest.mark.parametrize("case", ["alexnet_lrn", "resnet20_option_a"])
def test_mixed_float16_computes_in_half_and_returns_float32_logits(case):
    name, options = FORMAT_CASES[case]
    model = models.build(name, dtype="mixed_float16", **options)
    conv1 = model.get_layer("conv1")
    assert conv1.compute_dtype == "float16" and conv1.kernel.dtype == "float32"
    assert model.layers[-1].name == "logits"
    logits = model(_images(model), training=False)
    assert logits.dtype == "float32"
    assert np.all(np.isfinite(logits.numpy()))
    _compile(model)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    if case == "alexnet_lrn":  # one train step is enough to show float16 gradients flow
        assert np.isfinite(model.train_on_batch(_images(model), _labels(2, 10)))


def test_global_mixed_policy_is_honoured_and_logits_stay_float32():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.build("resnet20_cifar", num_classes=10)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("res4c_branch2b").compute_dtype == "float16"
    assert model(_images(model), training=False).dtype == "float32"
    float32_model = models.build("resnet20_cifar", num_classes=10)
    assert "logits" not in [layer.name for layer in float32_model.layers]


SAVE_CASES = {
    **{case: FORMAT_CASES[case] for case in ("alexnet_lrn", "alexnet_bn_small")},
    "resnet20_mixed": ("resnet20_cifar", {"num_classes": 10, "dtype": "mixed_float16"}),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_keras_file_round_trip_gives_equal_outputs(case, tmp_path):
    name, options = SAVE_CASES[case]
    model = models.build(name, **options)
    # Move every weight off its initial value (BN statistics included; a positive shift
    # keeps the variances valid) so that the loaded model cannot pass by re-initializing.
    rng = np.random.default_rng(5)
    model.set_weights(
        [w + rng.uniform(0.01, 0.02, w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    path = tmp_path / f"{case}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    # `weights`, not `variables`: dropout's RNG state is not part of a saved model.
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
    assert loaded.get_layer("conv1").dtype_policy.name == model.get_layer("conv1").dtype_policy.name
    images = _images(model, seed=2)
    np.testing.assert_array_equal(
        loaded(images, training=False).numpy(), model(images, training=False).numpy()
    )


# --- the custom layers ----------------------------------------------------------------------


def _caffe_lrn(x: np.ndarray, size: int, alpha: float, beta: float, k: float) -> np.ndarray:
    """Caffe's LRNLayer, ACROSS_CHANNELS, on NHWC input, written from its documentation."""
    x = x.astype(np.float64)
    channels = x.shape[-1]
    out = np.empty_like(x)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + size // 2 + 1)
        scale = k + alpha / size * np.sum(x[..., lo:hi] ** 2, axis=-1)
        out[..., c] = x[..., c] / scale**beta
    return out


@pytest.mark.parametrize(
    ("size", "alpha", "beta", "k"), [(5, 1e-4, 0.75, 1.0), (5, 0.1, 0.75, 1.0), (3, 0.5, 0.5, 2.0)]
)
def test_lrn_matches_caffe_and_tf_with_alpha_divided_by_size(size, alpha, beta, k):
    x = np.random.default_rng(3).normal(scale=5.0, size=(2, 4, 3, 9)).astype(np.float32)
    layer = LocalResponseNormalization(size=size, alpha=alpha, beta=beta, k=k)
    out = layer(x).numpy()
    np.testing.assert_allclose(out, _caffe_lrn(x, size, alpha, beta, k), rtol=1e-5, atol=1e-6)
    tf_out = tf.nn.local_response_normalization(
        x, depth_radius=size // 2, bias=k, alpha=alpha / size, beta=beta
    )
    np.testing.assert_allclose(out, tf_out.numpy(), rtol=1e-5, atol=1e-6)
    channels_first = LocalResponseNormalization(
        size=size, alpha=alpha, beta=beta, k=k, data_format="channels_first"
    )
    out_first = channels_first(np.transpose(x, (0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.transpose(out_first, (0, 2, 3, 1)), out, rtol=1e-6)


def test_lrn_in_float16_sums_in_float32():
    # Squares of 300 overflow float16 (max 65504); the layer must still give the float32 answer.
    x = np.full((1, 2, 2, 8), 300.0, np.float32)
    half = LocalResponseNormalization(alpha=0.1, dtype="mixed_float16")(x)
    assert half.dtype == "float16"
    np.testing.assert_allclose(
        half.numpy().astype(np.float32), _caffe_lrn(x, 5, 0.1, 0.75, 1.0), rtol=2e-3
    )


def test_lrn_rejects_even_windows():
    with pytest.raises(ValueError, match="size"):
        LocalResponseNormalization(size=4)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_zero_pad_shortcut_subsamples_and_appends_zero_channels(data_format):
    x = np.random.default_rng(4).normal(size=(2, 5, 5, 3)).astype(np.float32)
    layer = ZeroPadShortcut(8, strides=2, data_format=data_format)
    if data_format == "channels_first":
        out = np.transpose(layer(np.transpose(x, (0, 3, 1, 2))).numpy(), (0, 2, 3, 1))
    else:
        out = layer(x).numpy()
    assert out.shape == (2, 3, 3, 8)
    np.testing.assert_array_equal(out[..., :3], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(out[..., 3:], 0.0)
    with pytest.raises(ValueError, match="filters=2"):
        ZeroPadShortcut(2)(x)
