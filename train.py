"""Train and evaluate an image classifier with LARS, on one process or on an engine's workers.

    python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg --data_dir=/data/imagenet
    horovodrun -np 8 -H host1:4,host2:4 python train.py --flagfile=... --model_dir=...
    python train.py --engine=tf_distribute ...    # MirroredStrategy over this machine's GPUs
    python train.py --engine=jax ...              # Keras on JAX, DataParallel over its devices
    KERAS_DISTRIBUTION_NUM_PROCESSES=2 ... python train.py --engine=jax   # several processes

Flags in, then: the engine (lars_tf.engines), the input, the plan (lars_tf.plan), the
trainer (lars_tf.trainer), which resumes from the latest checkpoint in --model_dir, trains,
evaluates and reports; its outcome is the exit status: 0 when done, 3 when the loss became
NaN/Inf (`EXIT_DIVERGED`: a result, not a crash, which exits 1 as any Python error does),
143 after a SIGTERM (a checkpoint was written first). TensorFlow's oneDNN CPU kernels are on
unless TF_ENABLE_ONEDNN_OPTS is set (see below).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from lars_tf.engines import launch

FLAGS = flags.FLAGS
EXIT_DIVERGED = 3  # distinct from 1, the status of any uncaught error


def define_engine_flags(fv: flags.FlagValues) -> None:
    """The flags read before Keras is imported (they choose its backend)."""
    flags.DEFINE_enum(
        "engine",
        "horovod",
        launch.NAMES,
        "Distributed engine: horovod (one process per device, under horovodrun), "
        "tf_distribute (MirroredStrategy over one process's devices) or jax (Keras on JAX, "
        "keras.distribution.DataParallel over the devices of one process, or of several "
        "started with KERAS_DISTRIBUTION_JOB_ADDRESSES/_NUM_PROCESSES/_PROCESS_ID).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "cpu_devices",
        0,
        "tf_distribute and jax: split the CPU into this many devices, to run several "
        "replicas without GPUs (tests, demos); 0: the real devices.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_workers",
        0,
        "Refuse to start unless the launch has this many worker processes (horovodrun -np, "
        "TF_CONFIG's workers); 0: any.",
        lower_bound=0,
        flag_values=fv,
    )


def _prepare_launch(argv: list[str]) -> Exception | None:
    """Set the backend for --engine before Keras is imported; the launch error, if any."""
    fv = flags.FlagValues()
    define_engine_flags(fv)
    try:
        fv(argv, known_only=True)
    except flags.Error:
        return None  # app.run reports it, with the usage line
    try:
        launch.check_launch(fv.engine, expected_workers=fv.num_workers)
    except launch.LaunchError as error:
        return error
    launch.prepare_environment(fv.engine, fv.cpu_devices)
    return None


_LAUNCH_ERROR = _prepare_launch(sys.argv)
if _LAUNCH_ERROR is not None:
    # Before Keras is imported: a KERAS_BACKEND it cannot load would hide the message.
    sys.exit(f"train.py: {_LAUNCH_ERROR}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's CPU kernels; TensorFlow reads the setting once, at import. By default it turns
# them on only on CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX, so not, e.g., on AMD
# EPYCs before Zen 4 or Intel Xeons before Cascade Lake: on such an EPYC the AlexNet twin's
# and ResNet-20's train steps ran 1.42x and 1.47x faster with them, and channels_first models
# cannot run on the CPU without them (`make bench` part 6 measures the ratio on any machine).
# TF_ENABLE_ONEDNN_OPTS=0 in the environment keeps them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import train_flags  # noqa: E402
from lars_tf import engines, losses, models  # noqa: E402
from lars_tf.trainer import Outcome, Trainer  # noqa: E402

define_engine_flags(FLAGS)
train_flags.define_all()


def write_flags(model_dir: str, plan: dict) -> None:
    """The flags (reloadable with --flagfile) and the derived plan, into the model directory."""
    tf.io.gfile.makedirs(model_dir)
    flagfile = FLAGS.flags_into_string()
    with tf.io.gfile.GFile(os.path.join(model_dir, "flags.txt"), "w") as f:
        f.write(flagfile)
    with tf.io.gfile.GFile(os.path.join(model_dir, "plan.json"), "w") as f:
        json.dump(plan, f, indent=2)
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "tensorboard", "train"))
    with writer.as_default(step=0):
        tf.summary.text("flags", "```\n" + flagfile + "\n```")
        tf.summary.text("plan", "```\n" + json.dumps(plan, indent=2) + "\n```")
    writer.close()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        engine = engines.create(FLAGS.engine, FLAGS.cpu_devices)
    except engines.LaunchError as error:
        raise app.UsageError(str(error)) from error
    engine.configure(FLAGS.threads_per_worker)  # before TensorFlow initializes its devices
    try:
        train_flags.check_engine(engine)
    except flags.ValidationError as error:
        raise app.UsageError(str(error)) from error
    # TensorFlow's INFO lines (one per checkpoint save) drown the per-epoch lines.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(engine.process_seed(FLAGS.seed))
    keras.mixed_precision.set_global_policy(FLAGS.dtype)

    batch = train_flags.per_worker_batch(engine.processes)
    image_size = FLAGS.image_size or models.default_image_size(FLAGS.model)
    spec, run_input = train_flags.build_input(engine.processes, engine.rank, batch, image_size)
    try:
        plan = train_flags.run_plan(spec.num_examples, engine.processes)
    except flags.ValidationError as error:
        raise app.UsageError(str(error)) from error
    peak_lr = train_flags.learning_rate()
    trainer = Trainer(
        engine=engine,
        plan=plan,
        build_model=lambda: train_flags.build_model(spec.num_classes, spec.image_shape),
        build_optimizer=lambda p: train_flags.build_optimizer(
            peak_lr, p.total_updates, p.warmup_updates, p.updates_per_epoch
        ),
        loss=losses.classification_loss(FLAGS.label_smoothing),
        data=run_input,
        model_dir=FLAGS.model_dir,
        options=train_flags.trainer_options(engine.name, terminal=sys.stdout.isatty()),
    )
    start = trainer.restore()
    if FLAGS.eval_only:
        if not trainer.restored_images:
            raise app.UsageError(f"--eval_only: no checkpoint in {FLAGS.model_dir}")
        trainer.report(_result_line(start, trainer.evaluate(FLAGS.bn_recalibration_batches)))
        return 0
    if engine.is_rank0():
        description = {
            **plan.as_dict(),
            "engine": engine.name,
            "replicas": engine.replicas,
            "peak_learning_rate": peak_lr,
            "num_classes": spec.num_classes,
            "image_shape": list(spec.image_shape),
        }
        write_flags(FLAGS.model_dir, description)
    if start:
        trainer.report(f"Resuming from {trainer.checkpointer.latest} at step {start}.")
    trainer.report(
        f"{FLAGS.model} on {spec.num_examples} images, {engine.processes} worker(s) x "
        f"{batch} x {plan.accumulation_steps} accumulation = global batch "
        f"{FLAGS.global_batch_size}; {plan.total_updates} steps ({plan.updates_per_epoch}/"
        f"epoch), warm-up {plan.warmup_updates}, peak LR {peak_lr:g}; engine {engine.describe()}"
    )
    result = trainer.run()
    if run_input.corrupt_count():
        logging.warning("%d corrupt training images were skipped.", run_input.corrupt_count())
    return _exit_status(trainer, result)


def _exit_status(trainer: Trainer, result) -> int:
    latest = trainer.checkpointer.latest
    if result.outcome is Outcome.DIVERGED:
        kept = (
            f"The last good checkpoint, {latest}, was kept."
            if latest
            else "No checkpoint was written before it."
        )
        trainer.report(
            "Training stopped: the loss or the weights became NaN or Inf at step "
            f"{result.step}. {kept}"
        )
        return EXIT_DIVERGED
    if result.outcome is Outcome.PREEMPTED:
        trainer.report(f"SIGTERM: stopped at step {result.step}; checkpoint {latest}.")
        return 143
    if result.outcome is Outcome.INCONSISTENT:
        return 1
    if result.evaluation is None:
        trainer.report(
            f"Trained {result.step} steps on synthetic data; not evaluated (--eval_steps)."
        )
        return 0
    target = FLAGS.target_accuracy
    if target is not None:
        reached = result.target_reached
        trainer.report(
            f"Target top-1 {100 * target:.2f}% reached at epoch {reached['epoch']}, update "
            f"{reached['update']}."
            if reached
            else f"Target top-1 {100 * target:.2f}% not reached."
        )
    trainer.report(_result_line(result.step, result.evaluation))
    return 0


def _result_line(step: int, results: dict) -> str:
    return (
        f"Evaluation at step {step} on {results['examples']} images: "
        f"top-1 {100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}%, "
        f"loss {results['loss']:.4f}"
    )


if __name__ == "__main__":
    app.run(main)
