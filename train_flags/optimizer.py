"""Flags of the optimizer: LARS (`lars_tf.LARS`) and its variants, or SGD; builds it."""

from __future__ import annotations

from absl import flags

from lars_tf.optimizer import LARS
from train_flags import _checks
from train_flags.schedule import build_schedule

FLAGS = flags.FLAGS


def define(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum(
        "optimizer",
        "lars",
        ["lars", "sgd"],
        "'lars', or 'sgd': momentum SGD with coupled weight decay (Caffe's, the paper's "
        "baselines), i.e. LARS with every variable excluded from layer adaptation.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "learning_rate", 0.1, "Base (peak) learning rate, before --lr_scaling; > 0.", flag_values=fv
    )
    flags.DEFINE_float("momentum", 0.9, "Momentum, in [0, 1).", flag_values=fv)
    flags.DEFINE_float(
        "label_smoothing",
        0.0,
        "Label smoothing of the cross-entropy, in [0, 1): Keras' definition, targets = "
        "(1 - s) x one-hot + s / classes (MLPerf's ResNet-50 recipes: 0.1).",
        flag_values=fv,
    )
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum.", flag_values=fv)
    flags.DEFINE_float(
        "weight_decay", 5e-4, "Coupled weight decay (beta), >= 0.", lower_bound=0.0, flag_values=fv
    )
    flags.DEFINE_float(
        "trust_coefficient", 0.001, "LARS trust coefficient (eta), > 0.", flag_values=fv
    )
    flags.DEFINE_float(
        "lars_epsilon",
        0.0,
        "Added to the LARS local-LR denominator, >= 0.",
        lower_bound=0.0,
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "exclude_bn_and_bias",
        False,
        "Exclude biases and batch-norm parameters from weight decay and layer adaptation "
        "(MLPerf practice; the paper adapted and decayed everything).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "exclude_from_weight_decay",
        [],
        "Regexes of variable paths excluded from decay.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "exclude_from_layer_adaptation",
        [],
        "Regexes of variable paths excluded from layer adaptation (local LR 1).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "decay_in_norm",
        False,
        "LARS variant G: local LR uses ||g + beta w|| (Model Garden).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "lr_outside_momentum",
        False,
        "LARS variant P': global LR outside the momentum (timm).",
        flag_values=fv,
    )
    flags.DEFINE_bool("clip_local_lr", False, "LARC clipping: local LR at most 1.", flag_values=fv)
    _checks.positive(fv, "learning_rate", "trust_coefficient")
    _checks.fraction_below_one(fv, "momentum", "label_smoothing")
    for name in ("exclude_from_weight_decay", "exclude_from_layer_adaptation"):
        _checks.single(fv, name, _checks.regexes, f"--{name} must hold valid regular expressions")


def build_optimizer(
    peak_lr: float,
    total_steps: int,
    warmup: int,
    steps_per_epoch: int,
    flag_values: flags.FlagValues = FLAGS,
) -> LARS:
    """LARS with its schedule; `--optimizer=sgd` is LARS without layer adaptation."""
    f = flag_values
    no_adaptation = list(f.exclude_from_layer_adaptation)
    if f.optimizer == "sgd":
        # Every variable excluded from adaptation (local LR 1): momentum SGD with the coupled
        # decay v = m v + lr (g + beta w), the Caffe SGD of the paper's baselines.
        no_adaptation = [""]
    return LARS(
        build_schedule(peak_lr, total_steps, warmup, steps_per_epoch, f),
        momentum=f.momentum,
        weight_decay=f.weight_decay,
        trust_coefficient=f.trust_coefficient,
        epsilon=f.lars_epsilon,
        nesterov=f.nesterov,
        exclude_from_weight_decay=list(f.exclude_from_weight_decay) or None,
        exclude_from_layer_adaptation=no_adaptation or None,
        exclude_bn_and_bias=f.exclude_bn_and_bias,
        decay_in_norm=f.decay_in_norm,
        lr_outside_momentum=f.lr_outside_momentum,
        clip_local_lr=f.clip_local_lr,
        gradient_accumulation_steps=f.grad_accum_steps if f.grad_accum_steps > 1 else None,
        name=f.optimizer,
    )
