"""Flags of the run's length, the batch and its split, and the learning-rate schedule.

Makes the run's `lars_tf.plan.RunPlan` (every length in optimizer updates) and the schedule
(`lars_tf.schedules.build`).
"""

from __future__ import annotations

import keras
from absl import flags

from lars_tf import plan, schedules
from train_flags import _checks

FLAGS = flags.FLAGS


def define(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_integer(
        "global_batch_size",
        256,
        "Images per optimizer update over all workers and accumulation steps. The per-worker "
        "batch is global / (workers x --grad_accum_steps) and must be a whole number.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "grad_accum_steps",
        1,
        "Micro-batches accumulated locally per optimizer update (one all-reduce per update).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "epochs", 90.0, "Training length in epochs of the training split, > 0.", flag_values=fv
    )
    flags.DEFINE_integer(
        "train_steps",
        None,
        "Training length in optimizer updates; overrides --epochs.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "lr_schedule",
        "poly",
        schedules.available(),
        "'poly': (1 - t/T)^power decay (the paper); 'multistep': x--lr_decay_rate at epochs.",
        flag_values=fv,
    )
    flags.DEFINE_float("poly_power", 2.0, "Power of the polynomial decay, > 0.", flag_values=fv)
    flags.DEFINE_float(
        "end_learning_rate",
        0.0,
        "Learning rate at the end of poly decay.",
        lower_bound=0.0,
        flag_values=fv,
    )
    flags.DEFINE_float(
        "warmup_epochs",
        0.0,
        "Warm-up length in epochs (0: none).",
        lower_bound=0.0,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "warmup_shape",
        "linear",
        ["linear", "quadratic"],
        "Warm-up ramp: linear (paper text, MLPerf) or quadratic (authors' Caffe code).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "warmup_start_lr",
        0.0,
        "Learning rate at the start of the warm-up.",
        lower_bound=0.0,
        flag_values=fv,
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
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_list(
        "lr_decay_epochs",
        [],
        "Multistep: epochs at which the rate is multiplied (e.g. 30,60,80).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "lr_decay_rate", 0.1, "Multistep: the factor applied at each epoch, in (0, 1].",
        flag_values=fv,
    )  # fmt: skip
    _checks.positive(fv, "epochs", "poly_power")
    _checks.single(
        fv, "lr_decay_rate", lambda v: 0.0 < v <= 1.0, "--lr_decay_rate must be in (0, 1]"
    )
    _checks.number_list(fv, "lr_decay_epochs")
    _checks.single(
        fv, "lr_decay_epochs", _checks.increasing, "--lr_decay_epochs must be increasing"
    )
    _checks.multi(
        fv,
        ["warmup_epochs", "epochs", "train_steps"],
        lambda f: f["train_steps"] is not None or f["warmup_epochs"] < f["epochs"],
        "--warmup_epochs must be shorter than --epochs (the warm-up must end before training)",
    )
    _checks.multi(
        fv,
        ["lr_schedule", "lr_decay_epochs"],
        lambda f: f["lr_schedule"] == "multistep" or not f["lr_decay_epochs"],
        "--lr_decay_epochs applies to --lr_schedule=multistep only",
    )


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


def build_schedule(
    peak_lr: float,
    total_steps: int,
    warmup: int,
    steps_per_epoch: int,
    flag_values: flags.FlagValues = FLAGS,
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The learning-rate schedule, in optimizer updates."""
    f = flag_values
    warmup_options = dict(
        warmup_steps=warmup, warmup_start_lr=f.warmup_start_lr, warmup_shape=f.warmup_shape
    )
    if f.lr_schedule == "poly":
        options = dict(
            power=f.poly_power,
            end_learning_rate=f.end_learning_rate,
            decay_after_warmup=f.decay_after_warmup,
        )
    else:
        boundaries = [int(round(float(e) * steps_per_epoch)) for e in f.lr_decay_epochs]
        options = dict(boundaries=boundaries, decay_rate=f.lr_decay_rate)
    return schedules.build(
        f.lr_schedule, peak_lr, total_steps=total_steps, **warmup_options, **options
    )
