"""Flags of the system (dtype, XLA, seeds, the all-reduce) and of the run (model directory,
checkpoints, evaluation, logs); checks the engine and gives the `TrainerOptions`."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from absl import flags, logging

from lars_tf.trainer import TrainerOptions
from train_flags import _checks
from train_flags.data import dataset_source
from train_flags.schedule import per_worker_batch

FLAGS = flags.FLAGS
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")


def define(fv: flags.FlagValues = FLAGS) -> None:
    _define_system(fv)
    _define_run(fv)


def _define_system(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "dtype", "float32", DTYPES, "Compute dtype policy (variables stay float32).", flag_values=fv
    )
    flags.DEFINE_bool(
        "xla",
        False,
        "Compile the train step with XLA (one replica only: Horovod's collectives "
        "cannot run inside XLA, and Keras' XLA step fails under a tf.distribute strategy; "
        "always on under --engine=jax).",
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
        lower_bound=0,
        flag_values=fv,
    )


def _define_run(fv: flags.FlagValues) -> None:
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
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "keep_checkpoints", 5, "Checkpoints kept (the newest).", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer(
        "eval_every_epochs",
        1,
        "Evaluation interval in epochs (0: at the end only).",
        lower_bound=0,
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
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "eval_steps",
        None,
        "Batches per evaluation (default: the whole split).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "progress_every_steps",
        50,
        "When stdout is not a terminal (horovodrun, a batch job), rank 0 prints a line every "
        "this many optimizer updates: update/total, epoch, loss, top-1 (running means on rank "
        "0's shard), images/s of the whole job, LR, elapsed and remaining time (0: off). On a "
        "terminal Keras' progress bar shows instead.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "log_every_steps",
        100,
        "Interval of the per-layer trust-ratio (local LR, ||w||, ||g||) TensorBoard logs, in "
        "optimizer updates (0: off).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "bn_recalibration_batches",
        0,
        "Before each evaluation (and --eval_only), re-estimate the batch-norm statistics "
        "from this many training batches with the current weights (lars_tf.batchnorm); "
        "0: off. Large batches mean few steps, and moving averages that lag the weights.",
        lower_bound=0,
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
    _checks.single(
        fv,
        "target_accuracy",
        lambda v: v is None or 0.0 < v <= 1.0,
        "--target_accuracy must be a fraction in (0, 1]",
    )
    _checks.single(
        fv,
        "init_weights",
        lambda v: v is None or (v.endswith(".weights.h5") and tf.io.gfile.exists(v)),
        "--init_weights must name an existing Keras .weights.h5 file",
    )
    _checks.multi(fv, ["model_dir"], lambda f: bool(f["model_dir"]), "--model_dir is required")


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


def configure_process(engine: Any, flag_values: flags.FlagValues = FLAGS) -> None:
    """The process-wide settings the flags give, before anything is built (after
    `engine.configure`): the log verbosity, op determinism, the seed (per process where the
    engine wants it) and the dtype policy."""
    f = flag_values
    # TensorFlow's INFO lines (one per checkpoint save) drown the per-epoch lines.
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if f.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(engine.process_seed(f.seed))
    keras.mixed_precision.set_global_policy(f.dtype)


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
