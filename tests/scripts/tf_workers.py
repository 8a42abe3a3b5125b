"""One `MultiWorkerMirroredStrategy` worker of `tests/test_engines.py`'s collectives test,
or one process over two devices (`--cpu_devices=2`, no TF_CONFIG).

    TF_CONFIG=... python tf_workers.py OUT_DIR [--timing]
    python tf_workers.py OUT_DIR --cpu_devices=2

Builds `TFDistributeEngine` from this process's `TF_CONFIG`, a small model (dense, batch norm,
dropout) and LARS under its strategy, exercises every collective the trainer uses (a weight
one worker perturbed before the broadcast, the broadcast, the batch-norm average, the
object broadcast, the sums, maxima and log means, the checkpoint's check for variables
synchronized on read) and writes what it saw to OUT_DIR/<rank>.json. With --timing it also
writes the time of one stop-decision all-reduce (`allreduce_max`) and of the same all-reduce
run eagerly, for the engine's note (never asserted). With --cpu_devices=2 it checks the
seed per replica of one process instead: after the broadcast, after a draw, and after a
checkpoint's save, restore and broadcast; it writes OUT_DIR/local.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import lars_tf  # noqa: E402
from lars_tf import keras_internals  # noqa: E402
from lars_tf.engines.tf_distribute import TFDistributeEngine  # noqa: E402


class OnRead(keras.layers.Layer):
    """A layer holding a variable synchronized on read, the kind Keras' metrics use."""

    def build(self, input_shape):
        self.total = keras.Variable(
            0.0, trainable=False, synchronization="on_read", aggregation="sum", name="total"
        )

    def call(self, inputs):
        return inputs


def _states(model) -> list[list[int]]:
    return [keras.ops.convert_to_numpy(s).tolist() for s in keras_internals.random_states(model)]


def _copies(model) -> list[list[int]]:
    """The one seed state's value on each local replica."""
    (state,) = keras_internals.random_states(model)
    return [c.numpy().tolist() for c in state.value.values]


def _model(name: str = "net") -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dropout(0.5, name="dropout"),
        ],
        name=name,
    )


def _masks(engine, model) -> list[list[float]]:
    """One dropout mask per local replica, drawn in a step of the strategy."""
    dropout = model.get_layer("dropout")
    masks = engine.strategy.run(tf.function(lambda: dropout(tf.ones((1, 64)), training=True)))
    return [m.numpy().tolist() for m in engine.strategy.experimental_local_results(masks)]


def local_main(out_dir: Path) -> None:
    from lars_tf.checkpoint import Checkpointer

    engine = TFDistributeEngine(cpu_devices=2)
    engine.configure(threads_per_worker=1)
    keras.utils.set_random_seed(7)
    with engine.scope():
        model = _model()
        optimizer = lars_tf.LARS(0.1)
        optimizer.build(model.trainable_variables)
    model.get_layer("dropout").seed_generator.next()  # one draw before: the count is kept
    seen = {"before": _copies(model)}
    engine.broadcast(model, optimizer)
    seen["after"] = _copies(model)
    seen["masks"] = _masks(engine, model)
    seen["after_draw"] = _copies(model)
    checkpointer = Checkpointer(out_dir / "local_ckpt", model, optimizer)
    checkpointer.save(images_seen=0, step=1)
    model.get_layer("dropout").seed_generator.next()  # moved on, then restored
    checkpointer.restore_latest()
    seen["restored"] = _copies(model)
    engine.broadcast(model, optimizer)
    seen["restored_and_broadcast"] = _copies(model)
    (out_dir / "local.json").write_text(json.dumps(seen))


def _median_ms(function, calls: int = 30) -> float:
    function()  # traced (or warmed) once
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(out_dir: Path, timing: bool) -> None:
    engine = TFDistributeEngine()
    engine.configure(threads_per_worker=1)
    rank, seen = engine.rank, {}
    seen["rank"], seen["workers"], seen["replicas"] = rank, engine.workers, engine.replicas
    keras.utils.set_random_seed(engine.process_seed(7))
    with engine.scope():
        model = _model()
        optimizer = lars_tf.LARS(0.1)
        optimizer.build(model.trainable_variables)
    weights = model.weights + optimizer.variables

    # Different draw counts and kernels on the two workers: the broadcast must give both
    # rank 0's (a sum, or rank 1's, would show).
    for _ in range(2 + rank):
        model.get_layer("dropout").seed_generator.next()
    seen["states_before"] = _states(model)
    if rank == 1:
        kernel = model.get_layer("dense").kernel
        kernel.assign(kernel + 1.0)
    seen["kernel_before"] = keras.ops.convert_to_numpy(model.get_layer("dense").kernel).tolist()
    seen["mismatches_before"] = engine.replica_mismatches(weights)
    engine.broadcast(model, optimizer)
    seen["mismatches_after"] = engine.replica_mismatches(weights)
    seen["kernel"] = keras.ops.convert_to_numpy(model.get_layer("dense").kernel).tolist()
    seen["states_after"] = _states(model)

    (seen["mask"],) = _masks(engine, model)
    seen["states_after_draw"] = _states(model)

    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(16, 10.0 * rank, np.float32))
    engine.average_model_state(model)
    seen["moving_mean"] = keras.ops.convert_to_numpy(bn.moving_mean).tolist()

    sent = {"from": rank, "text": "ü" * 3} if rank == 0 else None
    seen["object"] = engine._broadcast_object(sent)
    seen["sum"] = engine.allreduce_sum([rank, 1.0]).tolist()
    seen["max"] = engine.allreduce_max(float(rank))
    seen["logs"] = engine.average_logs({"loss": 0.5, "images_per_sec": 100.0 * (rank + 1)})

    # A seed past float64's exact range on one worker only: both refuse, neither waits.
    with engine.scope():
        big = _model("big")
    if rank == 1:
        (state,) = keras_internals.random_states(big)
        state.assign(np.array([2**53, 0], np.int64))
    try:
        engine.broadcast(big, optimizer)
        seen["integer_error"] = None
    except ValueError as error:
        seen["integer_error"] = str(error)

    engine.checkpointer(str(out_dir / f"ckpt{rank}"), model, optimizer, max_to_keep=1)
    with engine.scope():
        other = keras.Sequential([keras.Input((4,)), OnRead(name="on_read")], name="other")
    try:
        engine.checkpointer(str(out_dir / f"other{rank}"), other, optimizer, max_to_keep=1)
        seen["on_read_error"] = None
    except RuntimeError as error:
        seen["on_read_error"] = str(error)

    if timing:
        strategy = engine.strategy

        def eager_sum():
            value = tf.constant(np.zeros((2, 1)), tf.float64)
            per_replica = strategy.run(lambda: tf.identity(value))
            return strategy.reduce("SUM", per_replica, axis=None).numpy()

        seen["allreduce_max_ms"] = _median_ms(lambda: engine.allreduce_max(0.0))
        seen["eager_allreduce_ms"] = _median_ms(eager_sum)

    (out_dir / f"{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    if "--cpu_devices=2" in sys.argv[2:]:
        local_main(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), "--timing" in sys.argv[2:])
