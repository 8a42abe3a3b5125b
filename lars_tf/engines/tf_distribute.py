"""The tf.distribute engine: `MirroredStrategy` over the devices of one process.

    python train.py --engine=tf_distribute ...                   # every GPU of this machine
    python train.py --engine=tf_distribute --cpu_devices=2 ...   # two logical CPUs (tests)

Keras 3's `fit` under the strategy splits each batch over the replicas, sums their gradients
and applies one update to every replica's variables, so the process needs no collective of its
own. Three Keras 3 limits hold for every optimizer under a strategy, and the engine refuses the
options they break rather than train wrongly: `gradient_accumulation_steps` fails under
`MirroredStrategy`; under `mixed_float16` each replica decides alone whether its gradients are
finite (an overflow on another replica reaches the weights); and `fit` under
`MultiWorkerMirroredStrategy` fails on TensorFlow 2.21 with Keras' own SGD too
(keras-team/keras#20585; `tests/scripts/strategy_fit.py multi_worker` reproduces it), so
`lars_tf.engines.launch` refuses a `TF_CONFIG` of several workers until Keras fixes it.
"""

from __future__ import annotations

import zlib

import keras
import numpy as np
import tensorflow as tf

from lars_tf.engines.base import Engine


class TFDistributeEngine(Engine):
    name = "tf_distribute"

    def __init__(self, cpu_devices: int = 0) -> None:
        self.cpu_devices = cpu_devices
        self._strategy: tf.distribute.Strategy | None = None

    def configure(self, threads_per_worker: int = 0) -> None:
        if threads_per_worker:
            tf.config.threading.set_intra_op_parallelism_threads(threads_per_worker)
        if self.cpu_devices:
            # Before TensorFlow initializes its devices: N logical CPUs stand in for N GPUs.
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * self.cpu_devices
            )

    @property
    def strategy(self) -> tf.distribute.Strategy:
        if self._strategy is None:
            if self.cpu_devices:
                devices = [d.name for d in tf.config.list_logical_devices("CPU")]
                # NCCL, the default reduction, needs GPUs.
                self._strategy = tf.distribute.MirroredStrategy(
                    devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
                )
            else:
                self._strategy = tf.distribute.MirroredStrategy()
        return self._strategy

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def scope(self):
        return self.strategy.scope()

    def check(self, *, accumulation_steps: int, dtype: str = "float32", **options) -> None:
        super().check(accumulation_steps=accumulation_steps, **options)
        if accumulation_steps > 1:
            raise ValueError(
                f"--grad_accum_steps={accumulation_steps}: Keras 3's gradient accumulation fails "
                "under MirroredStrategy; use --engine=horovod or --engine=jax to accumulate"
            )
        if dtype == "mixed_float16" and self.replicas > 1:
            raise ValueError(
                f"--dtype=mixed_float16 on {self.replicas} replicas: under a strategy Keras' "
                "loss scaling decides per replica whether the gradients are finite, so one "
                "replica's overflow reaches the weights; use mixed_bfloat16 (no loss scaling), "
                "or --engine=horovod, which agrees on that decision across workers"
            )

    def average_model_state(self, model) -> None:
        # Keras creates the batch-norm moving statistics with aggregation "none": under the
        # strategy each replica updates its own copy from its share of the batch, and the
        # copies drift apart. Average them, as Horovod's workers do, before evaluating and
        # saving (a checkpoint would otherwise hold the first replica's).
        for variable in model.non_trainable_weights:
            copies = _copies(variable)
            if len(copies) < 2 or not _is_float(variable):
                continue
            mean = tf.add_n([tf.convert_to_tensor(c) for c in copies]) / len(copies)
            for copy in copies:
                copy.assign(mean)

    def replica_mismatches(self, variables) -> list[str]:
        differing = []
        for variable in variables:
            copies = _copies(variable)
            prints = {zlib.crc32(np.ascontiguousarray(c.numpy()).tobytes()) for c in copies}
            if len(prints) > 1:
                differing.append(getattr(variable, "path", variable.name))
        return differing


def _copies(variable) -> list:
    """The per-replica copies of a mirrored variable (one entry otherwise)."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return list(getattr(value, "values", [value]))


def _is_float(variable) -> bool:
    return keras.backend.standardize_dtype(variable.dtype).startswith(("float", "bfloat"))
