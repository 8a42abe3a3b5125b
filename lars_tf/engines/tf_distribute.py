"""The tf.distribute engine: `MirroredStrategy` over the devices of one process, or
`MultiWorkerMirroredStrategy` over several processes (machines) named by `TF_CONFIG`.

    python train.py --engine=tf_distribute ...                   # every GPU of this machine
    python train.py --engine=tf_distribute --cpu_devices=2 ...   # two logical CPUs (tests)
    # several machines, each started with its own task index:
    TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]},
                "task": {"type": "worker", "index": <0 or 1>}}' \
        python train.py --engine=tf_distribute ...

Keras 3's `fit` under the strategy splits each batch over the replicas, sums their gradients
and applies one update to every replica's variables, so the training step needs no collective
of its own. Under `MultiWorkerMirroredStrategy`:

- each worker reads its own shard at the per-worker batch, as under Horovod, and hands it to
  `fit` through `distribute_datasets_from_function` (Keras' own `experimental_distribute_dataset`
  would shard it again and split a batch it takes for the global one);
- Keras' `fit` fails there with Keras' own SGD too (keras-team/keras#20585), which
  `lars_tf.keras_internals.fit_under_multi_worker_mirrored` works around;
- the trainer's own collectives (the stop decision, metric sums, rank 0's restored state, the
  replica check) are all-reduces of the strategy, run eagerly between steps, in float64;
- the chief (rank 0) alone reads and writes checkpoints, and sends what it restored to the
  others.

Three Keras 3 limits hold for every optimizer under a strategy, and the engine refuses the
options they break rather than train wrongly: `gradient_accumulation_steps` fails under
`MirroredStrategy`; under `mixed_float16` each replica decides alone whether its gradients are
finite (an overflow on another replica reaches the weights).
"""

from __future__ import annotations

import json
import os
import pickle
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import keras_internals
from lars_tf.engines.base import Engine, run_on_root
from lars_tf.engines.launch import LaunchError, tf_config_workers


class TFDistributeEngine(Engine):
    name = "tf_distribute"

    def __init__(self, cpu_devices: int = 0) -> None:
        self.cpu_devices = cpu_devices
        self._strategy: tf.distribute.Strategy | None = None
        self.workers = max(1, tf_config_workers(os.environ))
        self._rank = 0
        if self.workers > 1:
            if cpu_devices:
                raise LaunchError(
                    f"--cpu_devices={cpu_devices} with a TF_CONFIG of {self.workers} workers: "
                    "MultiWorkerMirroredStrategy runs one replica per GPU, and one per worker on "
                    "a CPU; run without --cpu_devices"
                )
            self._rank = _tf_config_rank(json.loads(os.environ["TF_CONFIG"]))

    @property
    def processes(self) -> int:
        return self.workers

    @property
    def rank(self) -> int:
        return self._rank

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
            if self.workers > 1:
                # Reads TF_CONFIG; ring all-reduces between the workers' CPUs, NCCL between GPUs.
                self._strategy = tf.distribute.MultiWorkerMirroredStrategy()
            elif self.cpu_devices:
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

    def fit_input(self, model, dataset):
        if self.workers == 1:
            return super().fit_input(model, dataset)  # `fit` splits it over the devices
        keras_internals.fit_under_multi_worker_mirrored(model, dataset.element_spec)
        local = self.replicas // self.workers
        if local > 1:
            # The function's dataset gives one replica's batch; the local replicas take
            # consecutive ones, so one worker's micro-batch is split in order.
            dataset = dataset.rebatch(_batch_size(dataset) // local)
        return self.strategy.distribute_datasets_from_function(lambda context: dataset)

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

    # Collectives across workers (identities with one): all-reduces of the strategy, run eagerly
    # between steps. Only SUM and MEAN exist there, so every other one is a SUM of each
    # worker's values laid in its own row of zeros, which gathers them.

    def _gather(self, values: Any) -> np.ndarray:
        """Every worker's float64 `values`, stacked: shape (workers, *values.shape)."""
        values = np.asarray(values, np.float64)
        rows = np.zeros((self.workers, *values.shape))
        rows[self.rank] = values
        return self._sum(rows)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        strategy, local = self.strategy, self.replicas // self.workers
        tensor = tf.constant(values, tf.float64)

        def contribution():
            # Each worker once: its first replica adds the value, the others zeros.
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            first = tf.equal(replica % local, 0)
            return tf.where(first, tensor, tf.zeros_like(tensor))

        summed = strategy.reduce("SUM", strategy.run(contribution), axis=None)
        return np.asarray(summed.numpy(), np.float64)

    def allreduce_max(self, value: float, name: str = "lars_tf_max") -> float:
        if self.workers == 1:
            return float(value)
        return float(self._gather([value]).max())

    def allreduce_sum(self, values: Any, name: str = "lars_tf_sum") -> np.ndarray:
        if self.workers == 1:
            return np.asarray(values, np.float64)
        return self._sum(np.asarray(values, np.float64))

    def average_logs(self, logs: Mapping[str, Any], name: str = "lars_tf_logs") -> dict:
        if self.workers == 1:
            return dict(logs)
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0)
        means = self._sum(np.array([float(logs[k]) for k in keys])) / self.workers
        return {**logs, **dict(zip(keys, means.tolist(), strict=True))}

    def _broadcast_object(self, value: Any) -> Any:
        """Rank 0's picklable `value`, on every worker (bytes as float64: exact)."""
        data = np.frombuffer(pickle.dumps(value), np.uint8) if self.rank == 0 else None
        size = int(self._gather([0 if data is None else data.size])[0, 0])
        buffer = data.astype(np.float64) if data is not None else np.zeros(size)
        return pickle.loads(self._sum(buffer).astype(np.uint8).tobytes())

    def run_on_root(self, function: Callable[[], Any], what: str) -> Any:
        if self.workers == 1:
            return function()
        return run_on_root(
            function,
            what,
            rank=self.rank,
            broadcast_object=self._broadcast_object,
            barrier=lambda: self.allreduce_max(0.0),
        )

    def broadcast(self, model, optimizer) -> None:
        """Rank 0's weights, optimizer state and seed-generator states on every worker: a
        restored checkpoint is read by the chief alone (the model directory need not be
        shared)."""
        if self.workers == 1:
            return
        states = keras_internals.random_states(model)
        for variable in _unique([*model.weights, *optimizer.variables, *states]):
            value = keras.ops.convert_to_numpy(variable)
            root = self._sum((value if self.rank == 0 else np.zeros_like(value)).astype(np.float64))
            if any(variable is state for state in states):
                # Rank 0's count of draws, this worker's seed (as Horovod's workers keep).
                root = keras_internals.with_draws_of(value, root)
            variable.assign(np.asarray(root, dtype=value.dtype))

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
        if self.workers == 1:
            return
        # Across workers too, as Horovod's workers do.
        for variable in model.non_trainable_weights:
            if _is_float(variable):
                value = keras.ops.convert_to_numpy(variable)
                mean = self._sum(value.astype(np.float64)) / self.workers
                variable.assign(mean.astype(value.dtype))

    def replica_mismatches(self, variables: Sequence[Any]) -> list[str]:
        differing, prints = [], []
        for variable in variables:
            copies = _copies(variable)
            local = [zlib.crc32(np.ascontiguousarray(c.numpy()).tobytes()) for c in copies]
            if len(set(local)) > 1:
                differing.append(_path(variable))
            prints.append(local[0])
        if self.workers > 1 and variables:
            # A CRC-32 is below 2**32: exact in float64.
            across = self._gather(prints)
            differing += [
                _path(v)
                for v, column in zip(variables, across.T, strict=True)
                if np.ptp(column) and _path(v) not in differing
            ]
        return differing


def _tf_config_rank(config: dict) -> int:
    """This worker's rank in a TF_CONFIG (checked by `launch`): the chief, if there is one,
    is 0 and the workers follow."""
    task = config["task"]
    if task["type"] == "chief":
        return 0
    return int(task["index"]) + len(config["cluster"].get("chief", []))


def _batch_size(dataset: tf.data.Dataset) -> int:
    size = tf.nest.flatten(dataset.element_spec)[0].shape[0]
    if size is None:
        raise ValueError("the training dataset's batch size must be static (drop_remainder)")
    return int(size)


def _path(variable) -> str:
    return getattr(variable, "path", variable.name)


def _unique(variables: Sequence[Any]) -> list:
    seen, unique = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            unique.append(variable)
    return unique


def _copies(variable) -> list:
    """The per-replica copies of a mirrored variable (one entry otherwise)."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return list(getattr(value, "values", [value]))


def _is_float(variable) -> bool:
    return keras.backend.standardize_dtype(variable.dtype).startswith(("float", "bfloat"))
