"""The JAX engine: Keras 3 on JAX, `keras.distribution.DataParallel` over a process's devices.

    python train.py --engine=jax ...                   # every accelerator JAX sees
    python train.py --engine=jax --cpu_devices=2 ...   # two XLA host devices (tests)

`fit` shards each batch over the devices and XLA computes one step on the global batch: the
gradient, and the batch-norm statistics, are those of the whole batch (not per replica, as
under Horovod or a `MirroredStrategy`). tf.data stays the input pipeline (Keras feeds its
batches to JAX), so TensorFlow is kept off the GPUs. No TensorFlow op runs on the model:
checkpoints are NumPy archives (`lars_tf.checkpoint.ArrayCheckpointer`).
"""

from __future__ import annotations

import jax
import keras
import tensorflow as tf

from lars_tf import checkpoint
from lars_tf.engines.base import Engine


class JaxEngine(Engine):
    name = "jax"

    def __init__(self, cpu_devices: int = 0) -> None:
        if keras.backend.backend() != "jax":
            raise RuntimeError(
                f"--engine=jax needs KERAS_BACKEND=jax before Keras is imported (found "
                f"{keras.backend.backend()}); train.py sets it"
            )
        self.devices = jax.local_devices()
        if cpu_devices and len(self.devices) != cpu_devices:
            raise RuntimeError(
                f"--cpu_devices={cpu_devices} but JAX has {len(self.devices)} device(s): "
                "XLA_FLAGS must be set before JAX is imported (train.py sets it)"
            )

    @property
    def replicas(self) -> int:
        return len(self.devices)

    def configure(self, threads_per_worker: int = 0) -> None:
        if threads_per_worker:
            tf.config.threading.set_intra_op_parallelism_threads(threads_per_worker)
        # The input pipeline's TensorFlow must not take GPU memory JAX needs.
        tf.config.set_visible_devices([], "GPU")
        if len(self.devices) > 1:
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=self.devices)
            )

    def check(self, *, bn_recalibration: bool, **options) -> None:
        super().check(bn_recalibration=bn_recalibration, **options)
        if bn_recalibration:
            raise ValueError(
                "--bn_recalibration_batches: batch-norm re-estimation runs TensorFlow ops on "
                "the model and is not available under --engine=jax yet"
            )

    def checkpointer(self, directory, model, optimizer, max_to_keep):
        return checkpoint.ArrayCheckpointer(directory, model, optimizer, max_to_keep=max_to_keep)
