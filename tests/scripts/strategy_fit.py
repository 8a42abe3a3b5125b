"""`model.fit` with LARS under a tf.distribute strategy, or on one device; saves the result.

    python strategy_fit.py MODE OUT [--jit_compile=0|1] [--dtype=float32|mixed_float16]
        [--optimizer=lars|sgd] [--batch_norm] [--accumulation=K]

MODE is `one` (one device), `mirrored` (`MirroredStrategy` over two logical CPU devices) or
`multi_worker` (`MultiWorkerMirroredStrategy`; this process is one worker of the cluster in
`TF_CONFIG`, and only the chief writes OUT). The global batch is the same in every mode, so
the weights must match. OUT gets an .npz of the final weights and LARS's `layer_statistics()`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 4


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["one", "mirrored", "multi_worker"])
    parser.add_argument("out")
    parser.add_argument("--jit_compile", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--optimizer", default="lars", choices=["lars", "sgd"])
    parser.add_argument("--batch_norm", action="store_true")
    # Keras' `gradient_accumulation_steps`: K batches per update (with Keras' SGD only).
    parser.add_argument("--accumulation", type=int, default=None)
    # `fit`, or a custom loop (`strategy.run` of a step that calls `optimizer.apply`), the
    # other way to train under a strategy, or `fit` after lars_tf's workaround of Keras'
    # failures under MultiWorkerMirrored (`keras_internals.fit_under_multi_worker_mirrored`).
    parser.add_argument("--loop", default="fit", choices=["fit", "custom", "fit_workaround"])
    return parser.parse_args()


def _strategy(mode: str) -> tf.distribute.Strategy | None:
    if mode == "mirrored":
        # Before anything touches TensorFlow's devices: two logical CPUs stand in for two GPUs.
        (cpu,) = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if mode == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return None


def _custom_loop(model, data, strategy) -> list[float]:
    """One epoch of `strategy.run(step)`; returns the running mean of the batches' losses
    after each batch, as `fit` logs it (its last is the epoch's loss)."""
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    optimizer = model.optimizer

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            # The sum over this replica's examples over the global batch: the replicas' summed
            # gradients are then the gradient of the mean over the global batch.
            loss = loss_fn(y, model(x, training=True)) / GLOBAL_BATCH
            scaled = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(scaled, [v.value for v in variables]), variables)
        return loss

    @tf.function
    def step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    losses = [float(step(batch)) for batch in strategy.experimental_distribute_dataset(data)]
    return [sum(losses[: i + 1]) / (i + 1) for i in range(len(losses))]


def main() -> int:
    args = _parse()
    strategy = _strategy(args.mode)

    import keras
    import numpy as np

    from lars_tf import LARS

    keras.utils.set_random_seed(0)
    if args.dtype != "float32":
        keras.mixed_precision.set_global_policy(args.dtype)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=(GLOBAL_BATCH * STEPS,)).astype("int32")

    def build_and_compile():
        layers = [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
        ]
        if args.batch_norm:
            layers.append(keras.layers.BatchNormalization(name="bn"))
        layers += [
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="fc", dtype="float32"),
        ]
        model = keras.Sequential(layers)
        if args.optimizer == "lars":
            optimizer = LARS(
                learning_rate=keras.optimizers.schedules.PolynomialDecay(2.0, STEPS, 0.5),
                momentum=0.9,
                weight_decay=5e-4,
                trust_coefficient=0.01,
                exclude_bn_and_bias=True,
                jit_compile=bool(args.jit_compile),
            )
        else:
            optimizer = keras.optimizers.SGD(
                0.1, momentum=0.9, gradient_accumulation_steps=args.accumulation
            )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    if strategy is None:
        model = build_and_compile()
    else:
        with strategy.scope():
            model = build_and_compile()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    if args.loop == "fit_workaround":
        from lars_tf import keras_internals

        keras_internals.fit_under_multi_worker_mirrored(model, data.element_spec)
    batch_losses = []  # the step's logs, as reduced over the replicas (reduce_per_replica)
    if args.loop in ("fit", "fit_workaround"):
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: batch_losses.append(float(logs["loss"]))
        )
        fit = model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        losses = fit.history["loss"]
    else:
        batch_losses = _custom_loop(model, data, strategy or tf.distribute.get_strategy())
        losses = batch_losses[-1:]

    chief = True
    if args.mode == "multi_worker":
        chief = json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0
    if chief:
        optimizer = model.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = optimizer.inner_optimizer
        arrays = {f"w_{v.path}": np.asarray(v.numpy()) for v in model.weights}
        arrays["loss"] = np.asarray(losses)
        arrays["batch_losses"] = np.asarray(batch_losses)
        arrays["iterations"] = np.asarray(int(optimizer.iterations.numpy()))
        if args.optimizer == "lars":
            # Updates compiled on their own with XLA (none under a strategy: see LARS's doc).
            arrays["compiled_updates"] = np.asarray(len(optimizer._xla_updates))
            # Every replica's copy of the statistics holds the same table.
            copies = [
                np.asarray(c)
                for c in (strategy or tf.distribute.get_strategy()).experimental_local_results(
                    optimizer._statistics.value
                )
            ]
            arrays["statistics_copies"] = np.asarray(len(copies))
            arrays["statistics_spread"] = np.asarray(
                max(float(np.abs(c - copies[0]).max()) for c in copies)
            )
            for path, row in optimizer.layer_statistics().items():
                arrays[f"s_{path}"] = np.asarray(
                    [row[k] for k in ("local_lr", "weight_norm", "grad_norm")]
                )
        np.savez(args.out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
