"""Train a tiny model with `model.fit` on a fixed data order; save the final weights.

Run as a plain process or under `horovodrun -np N`. Every optimizer update consumes the same
`global_batch` examples of a fixed array, however they are split: each of the N workers takes
a contiguous 1/N of the update's examples, in `accum` micro-batches. With averaged gradients
(`lars_tf.distributed.distribute_optimizer`) and Keras' gradient accumulation, the updates are
therefore those of one worker at the full batch, up to float32 rounding; tests/test_distributed.py
compares the saved weights across configurations and across ranks.

Usage: equivalence.py OUT_DIR GLOBAL_BATCH ACCUM STEPS [--mixed_float16] [--fp16_allreduce]
                      [--poison_last_rank_at=K]
`--poison_last_rank_at=K` puts an Inf into the last rank's first micro-batch of update K, so
that only that rank's gradients overflow (under mixed_float16 every rank must then skip it).
Writes OUT_DIR/rank<r>.npz with the trainable weights, the optimizer's update count, the
learning rate of the last update and the loss scale.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lars_tf import distributed  # noqa: E402
from lars_tf.optimizer import LARS  # noqa: E402
from lars_tf.schedules import PolynomialDecayWithWarmup  # noqa: E402

NUM_CLASSES = 5
IMAGE = (6, 6, 2)


def worker_data(global_batch: int, accum: int, steps: int, world: int, rank: int, poison=None):
    """This worker's micro-batches, in order, for `steps` updates."""
    rng = np.random.default_rng(0)
    n = global_batch * steps
    x = rng.normal(size=(n, *IMAGE)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    share = global_batch // world
    micro = share // accum
    idx = np.concatenate(
        [
            np.arange(s * global_batch + rank * share, s * global_batch + (rank + 1) * share)
            for s in range(steps)
        ]
    )
    x = x[idx]
    if poison is not None and rank == world - 1:
        x[poison * share] = np.inf
    return tf.data.Dataset.from_tensor_slices((x, y[idx])).batch(micro), micro


def main() -> None:
    out_dir, global_batch, accum, steps = sys.argv[1], *map(int, sys.argv[2:5])
    mixed = "--mixed_float16" in sys.argv
    compression = "fp16" if "--fp16_allreduce" in sys.argv else None
    poison = [int(a.split("=")[1]) for a in sys.argv if a.startswith("--poison_last_rank_at=")]
    world = distributed.init()
    distributed.configure_threads(intra_op=1, inter_op=1)
    rank = distributed.rank()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")

    # Different initial weights on every worker: the broadcast must make them rank 0's.
    keras.utils.set_random_seed(1000 + rank)
    model = keras.Sequential(
        [
            keras.Input(IMAGE),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu", name="fc1"),
            keras.layers.Dense(NUM_CLASSES, name="logits", dtype="float32"),
        ]
    )
    if rank == 0:
        # The same starting point in every configuration, whatever the world size.
        for i, v in enumerate(model.trainable_weights):
            v.assign(keras.random.normal(v.shape, stddev=0.3, seed=7 + i))
    # A rate that changes at every update: a schedule driven by micro-batches instead of
    # updates, or applied once per micro-batch, shows up as a different result.
    schedule = PolynomialDecayWithWarmup(0.5, decay_steps=steps + 2, warmup_steps=2)
    optimizer = LARS(
        schedule,
        momentum=0.9,
        weight_decay=1e-3,
        trust_coefficient=0.01,
        global_clipnorm=5.0,
        gradient_accumulation_steps=accum if accum > 1 else None,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    distributed.distribute_optimizer(model.optimizer, compression=compression)
    distributed.broadcast_model_and_optimizer(model, model.optimizer)

    data, _ = worker_data(global_batch, accum, steps, world, rank, poison[0] if poison else None)
    model.fit(
        data,
        epochs=1,
        steps_per_epoch=steps * accum,
        shuffle=False,
        verbose=0,
        callbacks=[distributed.MetricAverageCallback()],
    )
    lars = model.optimizer.inner_optimizer if mixed else model.optimizer
    # The distributed optimizer is still a plain, serializable LARS.
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(lars))
    serializes = type(restored) is LARS and restored.get_config() == lars.get_config()
    np.savez(
        os.path.join(out_dir, f"rank{rank}.npz"),
        world=world,
        serializes=serializes,
        updates=int(lars.iterations),
        learning_rate=float(lars.learning_rate),
        loss_scale=float(model.optimizer.dynamic_scale) if mixed else 1.0,
        **{f"weight_{i}": v.numpy() for i, v in enumerate(model.trainable_weights)},
    )


if __name__ == "__main__":
    main()
