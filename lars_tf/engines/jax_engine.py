"""The JAX engine: Keras 3 on JAX, `keras.distribution.DataParallel` over every device of the
job: one process's, or several processes' through `keras.distribution.initialize`.

    python train.py --engine=jax ...                   # every accelerator JAX sees
    python train.py --engine=jax --cpu_devices=2 ...   # two XLA host devices (tests)
    # several processes (machines), each started with its own id:
    KERAS_DISTRIBUTION_JOB_ADDRESSES=host0:1234 KERAS_DISTRIBUTION_NUM_PROCESSES=2 \
        KERAS_DISTRIBUTION_PROCESS_ID=<0 or 1> python train.py --engine=jax ...

`fit` shards each batch over the devices and XLA computes one step on the global batch: the
gradient, and the batch-norm statistics, are those of the whole batch (not per replica, as
under Horovod or a `MirroredStrategy`). With several processes each one reads its own shard of
the input at the per-process batch (`auto_shard_dataset=False`: lars_tf's pipelines shard by
process, as under Horovod) and JAX assembles the global batch; CPU devices of several
processes communicate through Gloo (`jax_cpu_collectives_implementation`). tf.data stays the
input pipeline (Keras feeds its batches to JAX), so TensorFlow is kept off the GPUs. No
TensorFlow op runs on the model: checkpoints are NumPy archives
(`lars_tf.checkpoint.ArrayCheckpointer`), written by process 0.

The trainer's own collectives (the stop decision, metric sums, rank 0's restored state, the
replica check) go through `jax.experimental.multihost_utils`, in float64 sent as bytes: JAX
without `jax_enable_x64` would round float64 to float32.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import keras
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from lars_tf import checkpoint
from lars_tf.engines.base import Engine
from lars_tf.engines.launch import jax_processes


class JaxEngine(Engine):
    name = "jax"

    def __init__(self, cpu_devices: int = 0) -> None:
        if keras.backend.backend() != "jax":
            raise RuntimeError(
                f"--engine=jax needs KERAS_BACKEND=jax before Keras is imported (found "
                f"{keras.backend.backend()}); train.py sets it"
            )
        if jax_processes(os.environ) > 1:
            # Before JAX starts a backend: XLA's CPU client has no cross-process collectives
            # unless told to use Gloo (accelerators use their own, NCCL on GPUs).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            keras.distribution.initialize()  # reads KERAS_DISTRIBUTION_*
        self.devices = jax.devices()
        local = jax.local_devices()
        if cpu_devices and len(local) != cpu_devices:
            raise RuntimeError(
                f"--cpu_devices={cpu_devices} but JAX has {len(local)} device(s) in this "
                "process: XLA_FLAGS must be set before JAX is imported (train.py sets it)"
            )

    @property
    def processes(self) -> int:
        return jax.process_count()

    @property
    def rank(self) -> int:
        return jax.process_index()

    @property
    def replicas(self) -> int:
        return len(self.devices)

    def process_seed(self, seed: int) -> int:
        # One SPMD program over every process: the variables (and the dropout seed state)
        # must start equal everywhere (JAX checks it when they are placed), and the masks of
        # the global batch differ per example anyway.
        return seed

    def configure(self, threads_per_worker: int = 0) -> None:
        if threads_per_worker:
            tf.config.threading.set_intra_op_parallelism_threads(threads_per_worker)
        # The input pipeline's TensorFlow must not take GPU memory JAX needs.
        tf.config.set_visible_devices([], "GPU")
        if len(self.devices) > 1:
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=self.devices, auto_shard_dataset=False)
            )

    # Collectives across processes (identities with one).

    def _gather(self, values: Any) -> np.ndarray:
        """Every process's float64 `values`, stacked: shape (processes, *values.shape)."""
        values = np.ascontiguousarray(np.asarray(values, np.float64))
        raw = multihost_utils.process_allgather(values.reshape(-1).view(np.uint8))
        return np.asarray(raw).view(np.float64).reshape(self.processes, *values.shape)

    def allreduce_max(self, value: float, name: str = "lars_tf_max") -> float:
        if self.processes == 1:
            return float(value)
        return float(self._gather([value]).max())

    def allreduce_sum(self, values: Any, name: str = "lars_tf_sum") -> np.ndarray:
        if self.processes == 1:
            return np.asarray(values, np.float64)
        return self._gather(values).sum(axis=0)

    def average_logs(self, logs: Mapping[str, Any], name: str = "lars_tf_logs") -> dict:
        if self.processes == 1:
            return dict(logs)
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0)
        means = self._gather([float(logs[k]) for k in keys]).mean(axis=0)
        return {**logs, **dict(zip(keys, means.tolist(), strict=True))}

    def _broadcast_object(self, value: Any) -> Any:
        """Process 0's picklable `value`, on every process."""
        data = np.frombuffer(pickle.dumps(value), np.uint8) if self.rank == 0 else None
        size = int(self._gather([0 if data is None else data.size])[0, 0])
        buffer = data if data is not None else np.zeros(size, np.uint8)
        return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())

    def restore(self, checkpointer: Any, model: Any, optimizer: Any) -> int:
        """Process 0 reads the checkpoint (the model directory need not be shared), sends its
        values, and every process assigns them: with several processes an assignment is a
        collective (JAX checks that each process places the same value), so rank 0 cannot
        assign alone. (So the engine needs no `broadcast`: nothing else differs between
        the processes, which start from one seed.)"""
        if self.processes == 1:
            return checkpointer.restore_latest()
        images, values = self.run_on_root(checkpointer.read_latest, "restore the latest checkpoint")
        checkpointer.assign(values)
        return images

    def replica_mismatches(self, variables: Sequence[Any]) -> list[str]:
        if self.processes == 1:
            return []
        sums = [np.sum(np.abs(keras.ops.convert_to_numpy(v).astype(np.float64))) for v in variables]
        gathered = self._gather(sums)
        return [v.path for v, column in zip(variables, gathered.T, strict=True) if np.ptp(column)]

    def checkpointer(self, directory, model, optimizer, max_to_keep):
        return checkpoint.ArrayCheckpointer(
            directory, model, optimizer, max_to_keep=max_to_keep, is_writer=self.is_rank0()
        )
