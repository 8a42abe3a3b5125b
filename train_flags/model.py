"""Flags of the architecture (`lars_tf.models`) and its options; builds the model."""

from __future__ import annotations

import keras
from absl import flags

from lars_tf import models
from train_flags import _checks
from train_flags._checks import floats

FLAGS = flags.FLAGS
ALEXNET_OPTIONS = ("width_multiplier", "groups", "normalization")


def define(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum(
        "model",
        "alexnet_bn",
        models.available(),
        "Model architecture (lars_tf.models).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Output classes; default: the dataset's (1000 for synthetic).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "width_multiplier",
        None,
        "AlexNet family only: channel width factor, > 0 (default: model's).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "groups",
        None,
        "AlexNet family only: filter groups of conv2/4/5 (default 2, the paper's; 1 is far "
        "faster on CPUs).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "normalization",
        None,
        ["lrn", "batch_norm", "batch_norm_all", "none"],
        "AlexNet family only: lrn (alexnet's), batch_norm (AlexNet-BN's: before conv2..5), "
        "batch_norm_all (also before fc6..8, every layer but fc8 scale-invariant; not in "
        "the paper) or none (default: the model's).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "dropout",
        None,
        "Dropout rate of the models that have it, in [0, 1) (default: 0.5).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "zero_init_residual",
        False,
        "ResNets only: zero-initialise the last BN scale of blocks.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "bn_momentum",
        None,
        "Batch-norm momentum (decay of the moving statistics, in [0, 1); default: the "
        "model's, 0.9). With few steps per run, lower it or use --bn_recalibration_batches.",
        flag_values=fv,
    )
    _checks.positive(fv, "width_multiplier")
    _checks.fraction_below_one(fv, "dropout", "bn_momentum")
    _checks.multi(
        fv,
        [*ALEXNET_OPTIONS, "model"],
        lambda f: all(f[k] is None for k in ALEXNET_OPTIONS) or f["model"].startswith("alexnet"),
        "--width_multiplier, --groups and --normalization apply to the AlexNet models only "
        "(alexnet, alexnet_bn, alexnet_bn_small)",
    )
    _checks.multi(
        fv,
        ["zero_init_residual", "model"],
        lambda f: not f["zero_init_residual"] or f["model"].startswith("resnet"),
        "--zero_init_residual applies to the ResNet models only",
    )


def model_options(flag_values: flags.FlagValues = FLAGS) -> dict:
    """Keyword options of `lars_tf.models.build` given on the command line."""
    options = {}
    for name in (*ALEXNET_OPTIONS, "dropout", "bn_momentum"):
        if flag_values[name].value is not None:
            options[name] = flag_values[name].value
    if flag_values.zero_init_residual:
        options["zero_init_residual"] = True
    if flag_values.normalize_on_device:
        # Mode "none" keeps the 0..255 values (the model only casts them).
        none = flag_values.preprocessing == "none"
        mean, std = floats(flag_values.mean), floats(flag_values.std)
        options["normalize_input"] = (None, None) if none else (mean, std)
    return options


def build_model(
    num_classes: int, image_shape: tuple[int, int, int], flag_values: flags.FlagValues = FLAGS
) -> keras.Model:
    return models.build(
        flag_values.model,
        num_classes=num_classes,
        input_shape=image_shape,
        dtype=flag_values.dtype,
        **model_options(flag_values),
    )
