"""Part 4's worker, one per rank: `horovodrun -np 2 -H localhost:2 --gloo python <this file>`.

Times, on every rank at once (a barrier before each sample), the all-reduce of a model's
gradient shapes (float32) issued as one `hvd.allreduce` per tensor in one `tf.function` (what
tensor fusion batches) and as one `hvd.grouped_allreduce` (what `lars_tf.distributed` issues);
with `--step`, also a training step with LARS made distributed by `lars_tf.distributed`
against the same step without the all-reduce. Rank 0 writes the samples to `--output` (JSON).
Only `horovod.tensorflow` is used: its Keras layer does not work with Keras 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# tools/ on the path, so that `bench` imports as a package when this file runs as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Horovod's tuning knobs worth recording (the launcher's rendezvous variables are not).
TUNING_ENV = (
    "HOROVOD_FUSION_THRESHOLD",
    "HOROVOD_CYCLE_TIME",
    "HOROVOD_CACHE_CAPACITY",
    "HOROVOD_CPU_OPERATIONS",
    "HOROVOD_HIERARCHICAL_ALLREDUCE",
)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON written by rank 0")
    parser.add_argument("--model", required=True, help="lars_tf.models name: gradient shapes")
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--step-model", help="also time a training step of this model")
    parser.add_argument("--step-image-size", type=int, default=128)
    parser.add_argument("--step-batch", type=int, default=8, help="images per rank")
    parser.add_argument("--step-rounds", type=int, default=3)
    return parser.parse_args(argv)


def _gradient_allreduce(hvd, tf, model: str, repeats: int, barrier) -> dict:
    from bench import timing
    from bench.optimizer_update import make_tensors, variable_shapes

    shapes = variable_shapes(model)
    _, grads = make_tensors(shapes, seed=hvd.rank())
    grads = [tf.constant(g) for g in grads]

    @tf.function
    def per_tensor():
        return [
            hvd.allreduce(g, op=hvd.Average, name=f"bench_gradient_{i}")
            for i, g in enumerate(grads)
        ]

    @tf.function
    def grouped():
        return hvd.grouped_allreduce(grads, op=hvd.Average, name="bench_gradients")

    samples = timing.run_interleaved(
        {"allreduce per tensor": per_tensor, "grouped_allreduce": grouped},
        repeats=repeats,
        warmup=2,
        before_each=barrier,
    )
    return {
        "model": model,
        "tensors": len(grads),
        "bytes": int(sum(int(tf.size(g)) for g in grads) * 4),
        "variants": {n: {"samples_s": s, **timing.summarize(s)} for n, s in samples.items()},
    }


def _training_step(hvd, tf, args, barrier) -> dict:
    import keras
    import numpy as np

    from bench import timing
    from lars_tf import distributed, models
    from lars_tf.optimizer import LARS

    distributed.init()
    rng = np.random.default_rng(hvd.rank())
    shape = (args.step_batch, args.step_image_size, args.step_image_size, 3)
    images = tf.constant(rng.standard_normal(shape), tf.float32)
    labels = tf.constant(rng.integers(0, 1000, args.step_batch), tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def build(distribute: bool) -> keras.Model:
        model = models.build(args.step_model, input_shape=shape[1:])
        model.compile(optimizer=LARS(0.1, momentum=0.9, weight_decay=5e-4), loss=loss)
        if distribute:
            distributed.distribute_optimizer(model.optimizer)
        distributed.broadcast_model_and_optimizer(model, model.optimizer)
        return model

    averaged, local = build(True), build(False)
    gradient_shapes = [tuple(v.shape) for v in averaged.trainable_variables]
    gradients = [tf.constant(rng.standard_normal(s), tf.float32) for s in gradient_shapes]

    @tf.function
    def allreduce_alone():
        return distributed.allreduce_gradients(gradients)

    names = ("step, gradients averaged", "step, local gradients", "all-reduce alone")
    samples = timing.run_interleaved(
        {
            names[0]: lambda: averaged.train_on_batch(images, labels),
            names[1]: lambda: local.train_on_batch(images, labels),
            names[2]: allreduce_alone,
        },
        repeats=args.step_rounds,
        warmup=2,
        before_each=barrier,
    )
    return {
        "model": args.step_model,
        "image_size": args.step_image_size,
        "batch_per_rank": args.step_batch,
        "variants": {n: {"samples_s": s, **timing.summarize(s)} for n, s in samples.items()},
        "communication_share": timing.summarize(
            [1.0 - b / a for a, b in zip(samples[names[0]], samples[names[1]], strict=True)]
        ),
        "allreduce_share": timing.paired_ratio(samples[names[2]], samples[names[0]]),
    }


def main(argv=None) -> int:
    args = _parse(argv)
    import tensorflow as tf

    # Two ranks on two cores: one thread each, or they fight over the same cores.
    threads = int(os.environ.get("TF_NUM_INTRAOP_THREADS", "1"))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import horovod.tensorflow as hvd

    hvd.init()

    def barrier():
        hvd.allreduce(tf.constant(0.0), name="bench_barrier")

    result = {
        "size": hvd.size(),
        "threads_per_rank": threads,
        "horovod_env": {k: os.environ[k] for k in TUNING_ENV if k in os.environ},
        "gradients": _gradient_allreduce(hvd, tf, args.model, args.repeats, barrier),
    }
    if args.step_model:
        result["step"] = _training_step(hvd, tf, args, barrier)
    if hvd.rank() == 0:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
