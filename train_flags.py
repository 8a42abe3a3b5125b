"""Command-line flags of `train.py`, grouped by concern, with their validators.

Each `define_*()` defines one group (TF Model Garden style); `define_all()` defines them all.
Validators run when the flags are parsed, before any data is read or file written, and name
the flag and the values allowed. Checks that need the world size (the batch split) or the size
of the dataset (warm-up versus `--train_steps`) live in the getters below, which `train.py`
calls before it builds anything. Flags are never modified: derived values come from getters.

Recipes are flag files: `python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg`.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import keras
import tensorflow as tf
from absl import flags

from lars_tf import data, models, plan, schedules
from lars_tf.optimizer import LARS
from lars_tf.trainer import RunInput, TrainerOptions

FLAGS = flags.FLAGS

DATASET_FORMS = ("tfrecord", "folder", "synthetic", "tfds:<name>")
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
PREPROCESSING = ("paper", "inception", "eval", "cifar", "none")


def define_model_flags(fv: flags.FlagValues = FLAGS) -> None:
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
        flag_values=fv,
    )
    flags.DEFINE_float(
        "width_multiplier",
        None,
        "AlexNet family only: channel width factor (default: model's).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "groups",
        None,
        "AlexNet family only: filter groups of conv2/4/5 (default 2, the paper's; 1 is far "
        "faster on CPUs).",
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
        "dropout", None, "Dropout rate of the models that have it (default: 0.5).", flag_values=fv
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
        "Batch-norm momentum (decay of the moving statistics; default: the model's, 0.9). "
        "With few steps per run, lower it or use --bn_recalibration_batches.",
        flag_values=fv,
    )


def define_data_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string(
        "dataset",
        "tfrecord",
        "Input source: 'tfrecord' (ImageNet TFRecord shards train-*/validation-* in "
        "--data_dir), 'folder' (JPEG class folders), 'tfds:<name>' (a prepared "
        "tensorflow-datasets dataset in --data_dir) or 'synthetic'.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data_dir", None, "Directory of the dataset (unused for synthetic).", flag_values=fv
    )
    flags.DEFINE_bool(
        "synthetic",
        False,
        "Train on synthetic images (overrides --dataset): a benchmark or smoke mode, which "
        "evaluates nothing unless --eval_steps is given (then that many batches).",
        flag_values=fv,
    )
    flags.DEFINE_string("train_split", "train", "Split to train on.", flag_values=fv)
    flags.DEFINE_string(
        "eval_split",
        "validation",
        "Split to evaluate on ('validation' falls back to 'test').",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "preprocessing",
        "paper",
        PREPROCESSING,
        "Augmentation (lars_tf.data.preprocessing).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "image_size", None, "Input side in pixels; default: the model's.", flag_values=fv
    )
    flags.DEFINE_integer(
        "resize_size",
        None,
        "Side images are resized to before cropping, in pixels.",
        flag_values=fv,
    )
    flags.DEFINE_integer("channels", 3, "Image channels: 3 (RGB) or 1 (grayscale).", flag_values=fv)
    flags.DEFINE_list(
        "mean",
        ["123.68", "116.78", "103.94"],
        "Per-channel mean subtracted, on the 0..255 scale (empty: none).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "std", [], "Per-channel standard deviation divided by (empty: none).", flag_values=fv
    )
    flags.DEFINE_integer(
        "shuffle_buffer", 10_000, "Examples held for shuffling, per worker.", flag_values=fv
    )
    flags.DEFINE_bool(
        "normalize_on_device",
        True,
        "The input pipeline delivers uint8 images and the model's first layer subtracts "
        "--mean and divides by --std on the accelerator (a quarter of the bytes per batch, "
        "no float work on the CPU); --nonormalize_on_device does it in tf.data.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "synthetic_examples",
        None,
        "Examples per synthetic epoch (default: ImageNet's).",
        flag_values=fv,
    )


def define_length_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_integer(
        "global_batch_size",
        256,
        "Images per optimizer update over all workers and accumulation steps. The per-worker "
        "batch is global / (workers x --grad_accum_steps) and must be a whole number.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "grad_accum_steps",
        1,
        "Micro-batches accumulated locally per optimizer update (one all-reduce per update).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "epochs", 90.0, "Training length in epochs of the training split.", flag_values=fv
    )
    flags.DEFINE_integer(
        "train_steps",
        None,
        "Training length in optimizer updates; overrides --epochs.",
        flag_values=fv,
    )


def define_optimizer_flags(fv: flags.FlagValues = FLAGS) -> None:
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
    flags.DEFINE_float("weight_decay", 5e-4, "Coupled weight decay (beta), >= 0.", flag_values=fv)
    flags.DEFINE_float(
        "trust_coefficient", 0.001, "LARS trust coefficient (eta), > 0.", flag_values=fv
    )
    flags.DEFINE_float(
        "lars_epsilon", 0.0, "Added to the LARS local-LR denominator, >= 0.", flag_values=fv
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


def define_schedule_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum(
        "lr_schedule",
        "poly",
        ["poly", "multistep"],
        "'poly': (1 - t/T)^power decay (the paper); 'multistep': x--lr_decay_rate at epochs.",
        flag_values=fv,
    )
    flags.DEFINE_float("poly_power", 2.0, "Power of the polynomial decay.", flag_values=fv)
    flags.DEFINE_float(
        "end_learning_rate", 0.0, "Learning rate at the end of poly decay.", flag_values=fv
    )
    flags.DEFINE_float("warmup_epochs", 0.0, "Warm-up length in epochs (0: none).", flag_values=fv)
    flags.DEFINE_enum(
        "warmup_shape",
        "linear",
        ["linear", "quadratic"],
        "Warm-up ramp: linear (paper text, MLPerf) or quadratic (authors' Caffe code).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "warmup_start_lr", 0.0, "Learning rate at the start of the warm-up.", flag_values=fv
    )
    flags.DEFINE_bool(
        "decay_after_warmup",
        False,
        "Poly decay over T - W after the warm-up (MLPerf) instead of over the full T.",
        flag_values=fv,
    )
    # No "workers" (Horovod's lr x hvd.size()): that convention scales a per-worker batch,
    # while --global_batch_size fixes the global batch whatever the worker count, so it would
    # only have changed the LR with the worker count at the same batch.
    flags.DEFINE_enum(
        "lr_scaling",
        "none",
        ["none", "linear"],
        "'linear': lr x global_batch / --reference_batch_size (Goyal et al.); 'none': as "
        "given. The global batch, hence the LR, is the same on any number of workers.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "reference_batch_size",
        256,
        "Batch size the base learning rate was tuned for.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "lr_decay_epochs",
        [],
        "Multistep: epochs at which the rate is multiplied (e.g. 30,60,80).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "lr_decay_rate", 0.1, "Multistep: the factor applied at each epoch.", flag_values=fv
    )


def define_system_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum(
        "dtype", "float32", DTYPES, "Compute dtype policy (variables stay float32).", flag_values=fv
    )
    flags.DEFINE_bool(
        "xla",
        False,
        "Compile the train step with XLA (single process only: Horovod's "
        "collectives cannot run inside XLA; always on under --engine=jax).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "seed", 42, "Seed of weight initialisation, shuffling and augmentation.", flag_values=fv
    )
    flags.DEFINE_bool(
        "deterministic",
        False,
        "Reproducible runs: deterministic ops and input order (slower).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "fp16_allreduce",
        False,
        "Send gradients as float16 in the all-reduce (half the traffic), each scaled by a "
        "power of two the workers agree on so that small gradients keep float16's precision.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "threads_per_worker",
        0,
        "Intra-op threads per worker; 0: cores / workers on this machine under Horovod, "
        "TensorFlow's default otherwise.",
        flag_values=fv,
    )


def define_run_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string(
        "model_dir",
        None,
        "Directory for checkpoints, TensorBoard events, CSV log and the flags used; a rerun "
        "with the same directory resumes from its latest checkpoint.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "checkpoint_every_steps",
        1000,
        "Checkpoint interval in optimizer updates (0: at epoch ends and at the end only).",
        flag_values=fv,
    )
    flags.DEFINE_integer("keep_checkpoints", 5, "Checkpoints kept (the newest).", flag_values=fv)
    flags.DEFINE_integer(
        "eval_every_epochs",
        1,
        "Evaluation interval in epochs (0: at the end only).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "target_accuracy",
        None,
        "Stop at the first evaluation whose top-1 reaches this fraction (MLPerf's 0.759 for "
        "ResNet-50), recording its epoch and update in results.json; evaluations happen "
        "every --eval_every_epochs.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "eval_batch_size",
        None,
        "Per-worker evaluation batch (default: the training one).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "eval_steps", None, "Batches per evaluation (default: the whole split).", flag_values=fv
    )
    flags.DEFINE_integer(
        "progress_every_steps",
        50,
        "When stdout is not a terminal (horovodrun, a batch job), rank 0 prints a line every "
        "this many optimizer updates: update/total, epoch, loss, top-1 (running means on rank "
        "0's shard), images/s of the whole job, LR, elapsed and remaining time (0: off). On a "
        "terminal Keras' progress bar shows instead.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "log_every_steps",
        100,
        "Interval of the per-layer trust-ratio (local LR, ||w||, ||g||) TensorBoard logs, in "
        "optimizer updates (0: off).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "bn_recalibration_batches",
        0,
        "Before each evaluation (and --eval_only), re-estimate the batch-norm statistics "
        "from this many training batches with the current weights (lars_tf.batchnorm); "
        "0: off. Large batches mean few steps, and moving averages that lag the weights.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "eval_only",
        False,
        "Evaluate the latest checkpoint in --model_dir, no training.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "init_weights",
        None,
        "Start from these model weights (a Keras .weights.h5 file, e.g. model.save_weights of "
        "this --model; any backend's) instead of a fresh initialisation; a checkpoint in "
        "--model_dir still takes precedence.",
        flag_values=fv,
    )


def define_all(fv: flags.FlagValues = FLAGS) -> None:
    """Defines every flag of `train.py` in `fv` and registers the validators, but the engine
    flags (`--engine`, `--cpu_devices`, `--num_workers`), which train.py defines itself: it
    reads them before Keras is imported, and this module imports Keras."""
    define_model_flags(fv)
    define_data_flags(fv)
    define_length_flags(fv)
    define_optimizer_flags(fv)
    define_schedule_flags(fv)
    define_system_flags(fv)
    define_run_flags(fv)
    register_validators(fv)


def _floats(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def _increasing(values: list[str]) -> bool:
    if not _floats(values):
        return True  # reported by the list's own validator
    numbers = [float(v) for v in values]
    return all(a < b for a, b in itertools.pairwise(numbers))


def _valid_regexes(patterns: list[str]) -> bool:
    try:
        [re.compile(p) for p in patterns]
    except re.error:
        return False
    return True


def _data_dir_exists(f: dict) -> bool:
    if f["synthetic"] or f["dataset"] == "synthetic" or not f["data_dir"]:
        return True
    # tensorflow-datasets may create its data_dir; every other source reads an existing one.
    return f["dataset"].startswith("tfds:") or os.path.isdir(f["data_dir"])


def register_validators(fv: flags.FlagValues = FLAGS) -> None:
    """Validators of single flags and of flag combinations (run at parse time)."""

    def single(name, checker, message):
        flags.register_validator(name, checker, message, flag_values=fv)

    def multi(names, checker, message):
        flags.register_multi_flags_validator(names, checker, message, flag_values=fv)

    for name in (
        "global_batch_size",
        "grad_accum_steps",
        "learning_rate",
        "trust_coefficient",
        "epochs",
        "keep_checkpoints",
        "shuffle_buffer",
        "poly_power",
        "reference_batch_size",
    ):
        single(name, lambda v: v is not None and v > 0, f"--{name} must be > 0")
    for name in (
        "train_steps",
        "num_classes",
        "image_size",
        "resize_size",
        "width_multiplier",
        "groups",
        "eval_batch_size",
        "eval_steps",
        "synthetic_examples",
    ):
        single(name, lambda v: v is None or v > 0, f"--{name} must be > 0 when given")
    for name in (
        "weight_decay",
        "lars_epsilon",
        "end_learning_rate",
        "warmup_epochs",
        "warmup_start_lr",
        "checkpoint_every_steps",
        "progress_every_steps",
        "eval_every_epochs",
        "log_every_steps",
        "threads_per_worker",
        "bn_recalibration_batches",
    ):
        single(name, lambda v: v is not None and v >= 0, f"--{name} must be >= 0")
    single("momentum", lambda v: 0.0 <= v < 1.0, "--momentum must be in [0, 1)")
    single("label_smoothing", lambda v: 0.0 <= v < 1.0, "--label_smoothing must be in [0, 1)")
    single(
        "target_accuracy",
        lambda v: v is None or 0.0 < v <= 1.0,
        "--target_accuracy must be a fraction in (0, 1]",
    )
    single("dropout", lambda v: v is None or 0.0 <= v < 1.0, "--dropout must be in [0, 1)")
    single("bn_momentum", lambda v: v is None or 0.0 <= v < 1.0, "--bn_momentum must be in [0, 1)")
    single("lr_decay_rate", lambda v: 0.0 < v <= 1.0, "--lr_decay_rate must be in (0, 1]")
    single("channels", lambda v: v in (1, 3), "--channels must be 1 or 3")
    single(
        "init_weights",
        lambda v: v is None or (v.endswith(".weights.h5") and tf.io.gfile.exists(v)),
        "--init_weights must name an existing Keras .weights.h5 file",
    )
    single(
        "dataset",
        lambda v: (
            v in ("tfrecord", "folder", "synthetic")
            or (v.startswith("tfds:") and len(v) > len("tfds:"))
        ),
        f"--dataset must be one of {', '.join(DATASET_FORMS)}",
    )
    for name in ("mean", "std", "lr_decay_epochs"):
        single(name, _floats, f"--{name} must be a comma-separated list of numbers")
    single("std", lambda v: not _floats(v) or all(float(x) > 0 for x in v), "--std must be > 0")
    single("lr_decay_epochs", _increasing, "--lr_decay_epochs must be increasing")
    for name in ("exclude_from_weight_decay", "exclude_from_layer_adaptation"):
        single(name, _valid_regexes, f"--{name} must hold valid regular expressions")

    multi(["model_dir"], lambda f: bool(f["model_dir"]), "--model_dir is required")
    multi(
        ["dataset", "synthetic", "data_dir"],
        lambda f: f["synthetic"] or f["dataset"] == "synthetic" or bool(f["data_dir"]),
        "--data_dir is required unless --dataset=synthetic or --synthetic",
    )
    multi(
        ["dataset", "synthetic", "data_dir"],
        _data_dir_exists,
        "--data_dir does not exist (or is not a directory)",
    )
    multi(
        ["warmup_epochs", "epochs", "train_steps"],
        lambda f: f["train_steps"] is not None or f["warmup_epochs"] < f["epochs"],
        "--warmup_epochs must be shorter than --epochs (the warm-up must end before training)",
    )
    multi(
        ["lr_schedule", "lr_decay_epochs"],
        lambda f: f["lr_schedule"] == "multistep" or not f["lr_decay_epochs"],
        "--lr_decay_epochs applies to --lr_schedule=multistep only",
    )
    multi(
        ["channels", "mean", "std"],
        lambda f: all(len(f[k]) in (0, 1, f["channels"]) for k in ("mean", "std")),
        "--mean and --std need 1 or --channels values each",
    )
    multi(
        ["width_multiplier", "groups", "normalization", "model"],
        lambda f: (
            all(f[k] is None for k in ("width_multiplier", "groups", "normalization"))
            or f["model"].startswith("alexnet")
        ),
        "--width_multiplier, --groups and --normalization apply to the AlexNet models only "
        "(alexnet, alexnet_bn, alexnet_bn_small)",
    )
    multi(
        ["zero_init_residual", "model"],
        lambda f: not f["zero_init_residual"] or f["model"].startswith("resnet"),
        "--zero_init_residual applies to the ResNet models only",
    )


# Getters: values derived from the flags, with the checks that need more than the flags.


def dataset_source(flag_values: flags.FlagValues = FLAGS) -> str:
    """The `lars_tf.data` source name: `--dataset`, or "synthetic" under `--synthetic`."""
    return "synthetic" if flag_values.synthetic else flag_values.dataset


def per_worker_batch(num_workers: int, flag_values: flags.FlagValues = FLAGS) -> int:
    """`--global_batch_size / (workers x --grad_accum_steps)`.

    Raises:
        flags.ValidationError: It does not divide evenly.
    """
    try:
        return plan.per_worker_batch_size(
            flag_values.global_batch_size, num_workers, flag_values.grad_accum_steps
        )
    except ValueError as error:  # "global_batch_size=... must be divisible by ..."
        raise flags.ValidationError(f"--{error}") from None


def check_engine(engine: Any, flag_values: flags.FlagValues = FLAGS) -> None:
    """Checks that depend on the engine and its worker count; raises `flags.ValidationError`."""
    f = flag_values
    per_worker_batch(engine.processes, f)
    try:
        engine.check(
            global_batch_size=f.global_batch_size,
            accumulation_steps=f.grad_accum_steps,
            fp16_allreduce=f.fp16_allreduce,
            xla=f.xla,
            bn_recalibration=bool(f.bn_recalibration_batches),
            dtype=f.dtype,
        )
    except ValueError as error:
        raise flags.ValidationError(str(error)) from None


def run_plan(
    train_examples: int, num_workers: int, flag_values: flags.FlagValues = FLAGS
) -> plan.RunPlan:
    """The run's `lars_tf.plan.RunPlan`, after the checks above (their messages name flags).

    Raises:
        flags.ValidationError: As `per_worker_batch` and `warmup_steps`.
    """
    per_worker_batch(num_workers, flag_values)
    updates_per_epoch = train_examples // flag_values.global_batch_size
    if updates_per_epoch < 1:
        raise flags.ValidationError(
            f"--global_batch_size={flag_values.global_batch_size} is larger than the "
            f"{train_examples} examples of the training split"
        )
    warmup_steps(updates_per_epoch, flag_values)
    return plan.make_plan(
        train_examples=train_examples,
        global_batch_size=flag_values.global_batch_size,
        workers=num_workers,
        accumulation_steps=flag_values.grad_accum_steps,
        epochs=flag_values.epochs,
        train_updates=flag_values.train_steps,
        warmup_epochs=flag_values.warmup_epochs,
        checkpoint_every_updates=flag_values.checkpoint_every_steps,
        progress_every_updates=flag_values.progress_every_steps,
    )


def learning_rate(flag_values: flags.FlagValues = FLAGS) -> float:
    """The peak learning rate after `--lr_scaling`; the same on any number of workers."""
    base = flag_values.learning_rate
    if flag_values.lr_scaling == "linear":
        return base * flag_values.global_batch_size / flag_values.reference_batch_size
    return base


def training_steps(steps_per_epoch: int, flag_values: flags.FlagValues = FLAGS) -> int:
    """Optimizer updates of the run: `--train_steps`, else `--epochs` x steps per epoch."""
    return plan.run_length(steps_per_epoch, flag_values.epochs, flag_values.train_steps)


def warmup_steps(steps_per_epoch: int, flag_values: flags.FlagValues = FLAGS) -> int:
    """Warm-up updates; checked against the run's length.

    Raises:
        flags.ValidationError: The warm-up is not shorter than training.
    """
    warmup = plan.warmup_length(steps_per_epoch, flag_values.warmup_epochs)
    total = training_steps(steps_per_epoch, flag_values)
    if warmup and warmup >= total:
        raise flags.ValidationError(
            f"--warmup_epochs={flag_values.warmup_epochs:g} is {warmup} steps at "
            f"{steps_per_epoch} steps per epoch, not shorter than the {total} training steps "
            "(--train_steps / --epochs)"
        )
    return warmup


def decay_boundaries(steps_per_epoch: int, flag_values: flags.FlagValues = FLAGS) -> list[int]:
    """Multistep boundaries in optimizer updates."""
    return [int(round(float(e) * steps_per_epoch)) for e in flag_values.lr_decay_epochs]


def floats(values: list[str]) -> tuple[float, ...] | None:
    """A list flag of numbers as a tuple, None when empty."""
    return tuple(float(v) for v in values) if values else None


def model_options(flag_values: flags.FlagValues = FLAGS) -> dict:
    """Keyword options of `lars_tf.models.build` given on the command line."""
    options = {}
    for name in ("width_multiplier", "groups", "normalization", "dropout", "bn_momentum"):
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


def build_schedule(
    peak_lr: float,
    total_steps: int,
    warmup: int,
    steps_per_epoch: int,
    flag_values: flags.FlagValues = FLAGS,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The learning-rate schedule, in optimizer updates."""
    f = flag_values
    if f.lr_schedule == "poly":
        return schedules.PolynomialDecayWithWarmup(
            peak_lr,
            decay_steps=total_steps,
            power=f.poly_power,
            end_learning_rate=f.end_learning_rate,
            warmup_steps=warmup,
            warmup_start_lr=f.warmup_start_lr,
            warmup_shape=f.warmup_shape,
            decay_after_warmup=f.decay_after_warmup,
        )
    return schedules.MultiStepWithWarmup(
        peak_lr,
        boundaries=decay_boundaries(steps_per_epoch, f),
        decay_rate=f.lr_decay_rate,
        warmup_steps=warmup,
        warmup_start_lr=f.warmup_start_lr,
        warmup_shape=f.warmup_shape,
    )


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


def build_input(
    num_workers: int,
    rank: int,
    batch: int,
    image_size: int,
    flag_values: flags.FlagValues = FLAGS,
) -> tuple[data.InputSpec, RunInput]:
    """This worker's training spec (the first epoch's) and the `lars_tf.trainer.RunInput`.

    `corrupt_count()` of the input is the number of undecodable training images skipped so
    far, over every pipeline its `dataset_for_epoch` built.
    """
    f = flag_values
    source = dataset_source(f)
    common = dict(
        data_dir=f.data_dir,
        image_size=image_size,
        preprocessing=f.preprocessing,
        num_shards=num_workers,
        shard_index=rank,
        deterministic=f.deterministic,
        dtype=f.dtype,
        num_classes=f.num_classes,
        resize_size=f.resize_size,
        channels=f.channels,
        mean=floats(f.mean),
        std=floats(f.std),
        normalize=not f.normalize_on_device,
    )
    if source == "synthetic" and f.synthetic_examples:
        common["num_examples"] = f.synthetic_examples

    def train_spec(epoch: int) -> data.InputSpec:
        # A resumed run rebuilds the input at its epoch; offset the seed so that epoch's
        # order is not the first epoch's again.
        return data.build_dataset(
            source,
            split=f.train_split,
            batch_size=batch,
            is_training=True,
            seed=f.seed + epoch,
            shuffle_buffer=f.shuffle_buffer,
            **common,
        )

    first = train_spec(0)
    built = [first]

    def dataset_for_epoch(epoch: int) -> Any:
        if epoch == 0:
            return first.dataset
        built.append(train_spec(epoch))
        return built[-1].dataset

    evaluation = data.build_dataset(
        source,
        split=f.eval_split,
        batch_size=f.eval_batch_size or batch,
        is_training=False,
        seed=f.seed,
        **common,
    )
    return first, RunInput(
        dataset_for_epoch,
        evaluation.dataset,
        corrupt_count=lambda: sum(s.corrupt_count() for s in built),
    )


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


def trainer_options(
    engine: str, terminal: bool, flag_values: flags.FlagValues = FLAGS
) -> TrainerOptions:
    """The `lars_tf.trainer.TrainerOptions` the flags give, for the engine named."""
    f = flag_values
    return TrainerOptions(
        # A synthetic run is a benchmark or a smoke test: evaluating its random images
        # (50,000 by default) would take longer than the run, so it evaluates only if asked.
        evaluates=dataset_source(f) != "synthetic" or f.eval_steps is not None,
        eval_every_epochs=f.eval_every_epochs,
        eval_steps=f.eval_steps,
        target_top1=f.target_accuracy,
        bn_recalibration_batches=f.bn_recalibration_batches,
        layer_statistics_every_updates=f.log_every_steps,
        keep_checkpoints=f.keep_checkpoints,
        # --deterministic: the same batches at every step however often the run is resumed.
        exact_resume=f.deterministic,
        compression="fp16" if f.fp16_allreduce else None,
        # Keras on JAX without jit runs the step op by op: the JAX engine always compiles.
        jit_compile=True if engine == "jax" else f.xla,
        terminal=terminal,
        init_weights=f.init_weights,
    )
