"""Train and evaluate an image classifier with LARS, on one process or on an engine's workers.

    python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg --data_dir=/data/imagenet
    horovodrun -np 8 -H host1:4,host2:4 python train.py --flagfile=... --model_dir=...
    python train.py --engine=tf_distribute ...    # MirroredStrategy over this machine's GPUs
    TF_CONFIG='{"cluster": {"worker": ["h0:2222", "h1:2222"]}, "task": {"type": "worker",
        "index": 0}}' python train.py --engine=tf_distribute ...   # one worker of several
    python train.py --engine=jax ...              # Keras on JAX, DataParallel over its devices
    KERAS_DISTRIBUTION_NUM_PROCESSES=2 ... python train.py --engine=jax   # several processes

Flags (train_flags) in, then the engine (lars_tf.engines), the input, the plan (lars_tf.plan)
and the trainer (lars_tf.trainer), which resumes from the latest checkpoint in --model_dir,
trains, evaluates and reports. Its outcome is the exit status: 0 when done, 3 when the loss
became NaN/Inf (a result, not a crash: any Python error exits 1), 143 after a SIGTERM (a
checkpoint was written first), 1 when the workers' replicas differ at the end.
"""

from __future__ import annotations

import sys

from absl import app, flags

import train_flags
from train_flags import engine as engine_flags

FLAGS = flags.FLAGS

_LAUNCH_ERROR = engine_flags.prepare_launch(sys.argv)
if _LAUNCH_ERROR is not None:
    # Before Keras is imported: a KERAS_BACKEND it cannot load would hide the message.
    sys.exit(f"train.py: {_LAUNCH_ERROR}")
from lars_tf import engines, evaluation, losses  # noqa: E402
from lars_tf.trainer import Outcome, Trainer  # noqa: E402

EXIT_STATUS = {
    Outcome.DONE: 0,
    Outcome.DIVERGED: 3,  # distinct from 1, the status of any uncaught error
    Outcome.PREEMPTED: 143,
    Outcome.INCONSISTENT: 1,
}
engine_flags.define(FLAGS)
train_flags.define_all()


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        engine = engines.create(FLAGS.engine, FLAGS.cpu_devices)
        engine.configure(FLAGS.threads_per_worker)  # before TensorFlow initializes its devices
        train_flags.check_engine(engine)
        train_flags.configure_process(engine)
        spec, run_input = train_flags.build_input(engine.processes, engine.rank)
        plan = train_flags.run_plan(spec.num_examples, engine.processes)
    except (engines.LaunchError, flags.ValidationError) as error:
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
        results = trainer.evaluate(FLAGS.bn_recalibration_batches)
        trainer.report(evaluation.result_line(start, results))
        trainer.wait_for_all()
        return 0
    trainer.write_description(
        FLAGS.flags_into_string(),
        peak_learning_rate=peak_lr,
        num_classes=spec.num_classes,
        image_shape=list(spec.image_shape),
    )
    if start:
        trainer.report(f"Resuming from {trainer.checkpointer.latest} at step {start}.")
    trainer.report(trainer.start_line(FLAGS.model, spec.num_examples, peak_lr))
    result = trainer.run()
    trainer.report(result.summary())
    trainer.wait_for_all()
    return EXIT_STATUS[result.outcome]


if __name__ == "__main__":
    app.run(main)
