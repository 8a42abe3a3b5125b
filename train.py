"""Train and evaluate an image classifier with LARS, on one process or under Horovod.

    python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg --data_dir=/data/imagenet
    horovodrun -np 8 -H host1:4,host2:4 python train.py --flagfile=... --model_dir=...

Flags in, then: build the input (sharded by worker), the model, the schedule and the
optimizer; average gradients across workers and broadcast rank 0's state; resume from the
latest checkpoint in --model_dir; `fit`; evaluate; report. The flags are in train_flags.py,
the machinery in lars_tf (training, distributed, callbacks). Rerunning the same command
resumes where the previous run stopped (see lars_tf.training for the exact semantics).
Exit status: 0 when done, 3 when the loss became NaN/Inf (`EXIT_DIVERGED`: a result, not a
crash, which exits 1 as any Python error does), 143 after a SIGTERM (a checkpoint was
written first). TensorFlow's oneDNN CPU kernels are on unless TF_ENABLE_ONEDNN_OPTS is set
(see below).
"""

from __future__ import annotations

import json
import os
import sys

# Before TensorFlow starts its thread pools: ranks sharing a machine split its cores
# (horovodrun sets HOROVOD_LOCAL_SIZE), or two ranks on two cores each spawn two threads.
if "HOROVOD_LOCAL_SIZE" in os.environ:
    _cores = max(1, (os.cpu_count() or 1) // int(os.environ["HOROVOD_LOCAL_SIZE"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_cores))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
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
from absl import app, flags, logging  # noqa: E402

import train_flags  # noqa: E402
from lars_tf import (  # noqa: E402
    batchnorm,
    callbacks,
    data,
    distributed,
    losses,
    models,
    progress,
    training,
)

train_flags.define_all()
FLAGS = flags.FLAGS
# The loss diverged (NaN/Inf): distinct from 1, the status of any uncaught error.
EXIT_DIVERGED = 3


def build_input(num_workers: int, rank: int, batch: int, image_size: int):
    """`(train spec, dataset_for_epoch, eval spec, corrupt_count)` for this worker.

    `corrupt_count()` is the number of undecodable training images skipped so far, over
    every pipeline `dataset_for_epoch` built.
    """
    source = train_flags.dataset_source()
    common = dict(
        data_dir=FLAGS.data_dir,
        image_size=image_size,
        preprocessing=FLAGS.preprocessing,
        num_shards=num_workers,
        shard_index=rank,
        deterministic=FLAGS.deterministic,
        dtype=FLAGS.dtype,
        num_classes=FLAGS.num_classes,
        resize_size=FLAGS.resize_size,
        channels=FLAGS.channels,
        mean=train_flags.floats(FLAGS.mean),
        std=train_flags.floats(FLAGS.std),
        normalize=not FLAGS.normalize_on_device,
    )
    if source == "synthetic" and FLAGS.synthetic_examples:
        common["num_examples"] = FLAGS.synthetic_examples

    def train_spec(epoch: int) -> data.InputSpec:
        # A resumed run rebuilds the input at its epoch; offset the seed so that epoch's
        # order is not the first epoch's again.
        return data.build_dataset(
            source,
            split=FLAGS.train_split,
            batch_size=batch,
            is_training=True,
            seed=FLAGS.seed + epoch,
            shuffle_buffer=FLAGS.shuffle_buffer,
            **common,
        )

    first = train_spec(0)
    built = [first]

    def dataset_for_epoch(epoch: int) -> tf.data.Dataset:
        if epoch == 0:
            return first.dataset
        built.append(train_spec(epoch))
        return built[-1].dataset

    evaluation = data.build_dataset(
        source,
        split=FLAGS.eval_split,
        batch_size=FLAGS.eval_batch_size or batch,
        is_training=False,
        seed=FLAGS.seed,
        **common,
    )
    return first, dataset_for_epoch, evaluation, lambda: sum(s.corrupt_count() for s in built)


def build_model(num_classes: int, image_shape: tuple[int, int, int]) -> keras.Model:
    return models.build(
        FLAGS.model,
        num_classes=num_classes,
        input_shape=image_shape,
        dtype=FLAGS.dtype,
        **train_flags.model_options(),
    )


def write_run_description(model_dir: str, plan: dict) -> None:
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


def report(message: str) -> None:
    if distributed.is_rank0():
        print(message, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    num_workers = distributed.init()
    rank = distributed.rank()
    try:
        train_flags.check_world(num_workers)
    except flags.ValidationError as error:
        raise app.UsageError(str(error)) from error
    # TensorFlow's INFO lines (one per checkpoint save) drown the per-epoch lines.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    distributed.configure_threads(FLAGS.threads_per_worker or None)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    # Per-rank seeds: dropout and augmentation differ across workers; the weights are made
    # equal by the broadcast below.
    keras.utils.set_random_seed(FLAGS.seed + rank)
    keras.mixed_precision.set_global_policy(FLAGS.dtype)

    batch = train_flags.per_worker_batch(num_workers)
    image_size = FLAGS.image_size or models.default_image_size(FLAGS.model)
    train_spec, dataset_for_epoch, eval_spec, corrupt_count = build_input(
        num_workers, rank, batch, image_size
    )
    # Every length of the run in optimizer updates; `plan` alone converts to other units.
    try:
        plan = train_flags.run_plan(train_spec.num_examples, num_workers)
    except flags.ValidationError as error:
        raise app.UsageError(str(error)) from error
    accum = plan.accumulation_steps
    peak_lr = train_flags.learning_rate()
    description = {
        **plan.as_dict(),
        "peak_learning_rate": peak_lr,
        "num_classes": train_spec.num_classes,
        "image_shape": list(train_spec.image_shape),
    }

    model = build_model(train_spec.num_classes, train_spec.image_shape)
    model.compile(
        optimizer=train_flags.build_optimizer(
            peak_lr, plan.total_updates, plan.warmup_updates, plan.updates_per_epoch
        ),
        loss=losses.classification_loss(FLAGS.label_smoothing),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(
                k=min(5, train_spec.num_classes), name="top5"
            ),
        ],
        jit_compile=FLAGS.xla,
    )
    # Average gradients once per update; then create the optimizer's slots so that rank 0's
    # weights and state (fresh, or restored below) can be sent to every worker.
    optimizer = distributed.distribute_optimizer(
        model.optimizer, compression="fp16" if FLAGS.fp16_allreduce else None
    )
    optimizer.build(model.trainable_variables)
    checkpointer = training.Checkpointer(
        os.path.join(FLAGS.model_dir, training.CHECKPOINT_SUBDIR),
        model,
        optimizer,
        max_to_keep=FLAGS.keep_checkpoints,
        is_writer=distributed.is_rank0(),
    )
    # Rank 0 reads the checkpoint (the model directory need not be shared); every rank gets
    # the images it had consumed, or the reason it could not be read, and then exits with it.
    images_seen = distributed.run_on_root(
        checkpointer.restore_latest, "restore the latest checkpoint"
    )
    distributed.broadcast_model_and_optimizer(model, optimizer)
    start_update = plan.updates_from_images(images_seen)

    if FLAGS.eval_only:
        if not images_seen:
            raise app.UsageError(f"--eval_only: no checkpoint in {FLAGS.model_dir}")
        if FLAGS.bn_recalibration_batches:
            batchnorm.recalibrate(model, train_spec.dataset, FLAGS.bn_recalibration_batches)
        results = training.evaluate(model, eval_spec.dataset, FLAGS.eval_steps)
        report(_result_line(start_update, results))
        return 0

    if distributed.is_rank0():
        write_run_description(FLAGS.model_dir, description)
    if start_update:
        report(f"Resuming from {checkpointer.latest} at step {start_update}.")
    report(
        f"{FLAGS.model} on {train_spec.num_examples} images, {num_workers} worker(s) x "
        f"{batch} x {accum} accumulation = global batch {FLAGS.global_batch_size}; "
        f"{plan.total_updates} steps ({plan.updates_per_epoch}/epoch), warm-up "
        f"{plan.warmup_updates}, peak LR {peak_lr:g}"
    )

    guard = training.RunGuard(
        plan.micro_batches(plan.total_updates), plan.micro_batches(start_update), accum
    )
    guard.install_signal_handler()
    # A synthetic run is a benchmark or a smoke test: evaluating its random images (50,000 by
    # default) would take longer than the run, so it evaluates only when asked to.
    evaluates = train_flags.dataset_source() != "synthetic" or FLAGS.eval_steps is not None
    evaluation = training.EvaluationCallback(
        eval_spec.dataset,
        guard,
        FLAGS.eval_every_epochs if evaluates else 0,
        FLAGS.eval_steps,
        target_top1=FLAGS.target_accuracy,
    )
    # Re-estimated batch-norm statistics for the epochs that evaluate (before the
    # evaluation and the checkpoint): few large-batch steps leave the moving averages stale.
    recalibration = (
        [
            batchnorm.BatchNormRecalibration(
                train_spec.dataset,
                FLAGS.bn_recalibration_batches,
                FLAGS.eval_every_epochs,
                guard,
            )
        ]
        if FLAGS.bn_recalibration_batches
        else []
    )
    run_callbacks = [
        guard,  # first: a NaN step must be known before anything saves it
        training.ThroughputCallback(plan.images_per_micro_batch),
        callbacks.LearningRateLogger(),
        distributed.MetricAverageCallback(),
        *recalibration,
        *([evaluation] if evaluates else []),
        training.CheckpointCallback(
            checkpointer, guard, plan.images_per_micro_batch, plan.checkpoint_every_updates
        ),
    ]
    if FLAGS.log_every_steps:
        run_callbacks.append(
            callbacks.LayerStatisticsLogger(
                os.path.join(FLAGS.model_dir, "tensorboard", "layers"),
                every_n_steps=FLAGS.log_every_steps,
                should_write=distributed.is_rank0,
            )
        )
    if distributed.is_rank0():
        run_callbacks += [
            keras.callbacks.TensorBoard(
                os.path.join(FLAGS.model_dir, "tensorboard"), write_graph=False
            ),
            keras.callbacks.CSVLogger(
                os.path.join(FLAGS.model_dir, "training_log.csv"), append=True
            ),
        ]
    terminal = sys.stdout.isatty()
    if distributed.is_rank0() and not terminal and plan.progress_every_updates:
        optimizer_of_updates = training.innermost_optimizer(optimizer)
        run_callbacks.append(
            progress.ProgressLogger(
                total_updates=plan.total_updates,
                start_update=start_update,
                updates_per_epoch=plan.updates_per_epoch,
                images_per_update=plan.global_batch_size,
                every_n_updates=plan.progress_every_updates,
                accumulation_steps=accum,
                learning_rate=lambda: float(optimizer_of_updates.learning_rate),
                print_fn=report,
            )
        )
    verbose = (1 if terminal else 2) if distributed.is_rank0() else 0
    training.fit(
        model,
        dataset_for_epoch,
        guard=guard,
        batches_per_epoch=plan.micro_batches(plan.updates_per_epoch),
        callbacks=run_callbacks,
        verbose=verbose,
        # --deterministic: the same batches at every step however often the run is resumed.
        exact_resume=FLAGS.deterministic,
    )
    guard.restore_signal_handler()
    if corrupt_count():
        logging.warning("%d corrupt training images were skipped.", corrupt_count())

    if guard.stop_reason == "nan":
        kept = (
            f"The last good checkpoint, {checkpointer.latest}, was kept."
            if checkpointer.latest
            else "No checkpoint was written before it."
        )
        report(
            f"Training stopped: the loss or the weights became NaN or Inf at step "
            f"{guard.failed_step}. {kept}"
        )
        return EXIT_DIVERGED
    if guard.stop_reason == "sigterm":
        report(f"SIGTERM: stopped at step {guard.step}; checkpoint {checkpointer.latest}.")
        return 143
    differing = distributed.replica_mismatches(model.weights + optimizer.variables)
    if differing:
        report(f"ERROR: the workers' replicas differ after training in: {', '.join(differing)}")
        return 1
    if num_workers > 1:
        report(f"Model and optimizer state are identical on all {num_workers} workers.")
    if not evaluates:
        if distributed.is_rank0():
            with tf.io.gfile.GFile(os.path.join(FLAGS.model_dir, "results.json"), "w") as f:
                json.dump({"step": guard.step}, f, indent=2)
        report(f"Trained {guard.step} steps on synthetic data; not evaluated (--eval_steps).")
        return 0
    results = evaluation.last_results
    if results is None or evaluation.last_step != guard.step:
        results = training.evaluate(model, eval_spec.dataset, FLAGS.eval_steps)
    summary = {"step": guard.step, **results}
    if FLAGS.target_accuracy is not None:
        summary["target_accuracy"] = FLAGS.target_accuracy
        summary["target_reached"] = evaluation.target_reached
        reached = evaluation.target_reached
        report(
            f"Target top-1 {100 * FLAGS.target_accuracy:.2f}% reached at epoch "
            f"{reached['epoch']}, update {reached['update']}."
            if reached
            else f"Target top-1 {100 * FLAGS.target_accuracy:.2f}% not reached."
        )
    if distributed.is_rank0():
        with tf.io.gfile.GFile(os.path.join(FLAGS.model_dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=2)
    report(_result_line(guard.step, results))
    return 0


def _result_line(step: int, results: dict) -> str:
    return (
        f"Evaluation at step {step} on {results['examples']} images: "
        f"top-1 {100 * results['top1']:.2f}%, top-5 {100 * results['top5']:.2f}%, "
        f"loss {results['loss']:.4f}"
    )


if __name__ == "__main__":
    app.run(main)
